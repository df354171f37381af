"""The edge-slm command line. A user's mistake prints one line and exits 1
(2 for a bad option or argument)."""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import signal
import sys
from pathlib import Path

import click

from .engine import MAX_SLOTS
from .errors import ContextOverflow, EdgeSlmError
from .options import Size, backend_options, engine_options, grounding_options, model_option, runtime_options
from .paths import check_writable, model_or_default, output_file

INTERRUPTED = 128 + signal.SIGINT  # the exit codes a shell gives a process killed by these
PIPE_CLOSED = 128 + signal.SIGPIPE


def say(line: str) -> None:
    """One line on stderr; if stderr itself cannot be written, there is no one to tell."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


class StdoutBroken(Exception):
    """Standard output cannot be written (a full disk, a closed pipe). Not an
    OSError, so that no handler for a file's errors (click's own EPIPE one
    included) takes it for one."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror)
        self.errno = error.errno


class StdoutFile(io.FileIO):
    """fd 1 under sys.stdout: a failed write raises StdoutBroken, and every
    write after it is dropped, so the interpreter's flush at exit cannot print
    a second error."""

    broken = False

    def write(self, data: bytes | memoryview) -> int:
        if self.broken:
            return memoryview(data).nbytes
        try:
            return super().write(data)
        except OSError as e:
            self.broken = True
            raise StdoutBroken(e) from None


def guard_stdout() -> None:
    """Put sys.stdout on a StdoutFile, keeping its encoding and buffering."""
    old = sys.stdout
    if old is not sys.__stdout__:  # a test runner's stream, or a caller's: theirs to handle
        return
    old.flush()
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(StdoutFile(old.fileno(), "w", closefd=False)),
                                  encoding=old.encoding, errors=old.errors,
                                  line_buffering=old.line_buffering)


class Group(click.Group):
    """Turns our own exceptions into one line on stderr and exit code 1, and a
    bad option or argument into one line and exit code 2 (click's default is
    the usage block as well). Standard output that cannot be written is one
    line too, or, once its reader has gone (`| head`), a quiet exit."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        if sys.stdout is None:  # fd 1 closed: the first file opened would take its place
            say("edge-slm: standard output is closed")
            sys.exit(1)
        guard_stdout()
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
            sys.stdout.flush()  # what is still buffered fails here, not at exit
        except StdoutBroken as e:
            if e.errno == errno.EPIPE:
                sys.exit(PIPE_CLOSED)
            say(f"edge-slm: cannot write to standard output ({e})")
            sys.exit(1)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "edge-slm"
            say(f"{where}: {e.format_message()} (see {where} --help)")
            sys.exit(e.exit_code)
        except click.ClickException as e:
            say(f"edge-slm: {e.format_message()}")
            sys.exit(e.exit_code)
        except click.Abort:  # an interrupt while click parsed; it has written the newline
            sys.exit(INTERRUPTED)
        except KeyboardInterrupt:
            say("")
            sys.exit(INTERRUPTED)
        sys.exit(code or 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeSlmError as e:
            say(f"edge-slm: {e}")
            ctx.exit(1)
        except KeyboardInterrupt:
            say("")  # ends the line the terminal's ^C is on
            ctx.exit(INTERRUPTED)


def setup_logging(verbose: int) -> None:
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(cls=Group)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Run a small language model on this device, offline."""
    setup_logging(verbose)


def sampling_options(f):
    f = click.option("--max-tokens", type=click.IntRange(1), default=None,
                     help="Answer length (default: the configured max_tokens, else 256).")(f)
    f = click.option("--temperature", type=click.FloatRange(0), default=None,
                     help="0 = greedy.")(f)
    f = click.option("--top-k", type=click.IntRange(0), default=40, show_default=True)(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95,
                     show_default=True)(f)
    f = click.option("--repeat-penalty", type=click.FloatRange(0, min_open=True), default=None,
                     help="Discourage repeats (default 1.1 for ask and chat, 1.0 for complete).")(f)
    f = click.option("--seed", type=click.IntRange(0), default=None, help="Seed for sampling.")(f)
    f = click.option("--stop", multiple=True, callback=check_stop_option,
                     help="Stop string (repeatable).")(f)
    return f


def check_stop_option(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    """Stop strings within the engine's bounds, refused as a bad option (exit 2) before the model loads."""
    if not value:
        return value
    from .generate import check_stop

    try:
        return check_stop(value)
    except EdgeSlmError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def sampling_config(temperature, top_k, top_p, repeat_penalty, seed, default_temperature: float,
                    default_repeat_penalty: float = 1.1):
    from .sampler import SamplingConfig

    t = default_temperature if temperature is None else temperature
    try:
        return SamplingConfig(temperature=t, top_k=top_k, top_p=top_p, seed=seed,
                              repeat_penalty=repeat_penalty or default_repeat_penalty)
    except ValueError as e:  # e.g. nan, which click's ranges let through
        raise click.UsageError(str(e)) from None


def stream_out(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@main.command()
def pull() -> None:
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1) and verify it."""
    from .pull import pull_model

    click.echo(str(pull_model()))


def open_engine(model_path, threads, n_ctx, kv_type, memory_budget, max_tokens, model_backend,
                execution_provider, index_path=None, ground=True):
    """One slot: the CLI asks one thing at a time, through the same engine as every front end,
    with the same settings file and environment. No deadline: the person at the terminal can
    stop it with Ctrl-C. Without `ground`, no index is opened."""
    from .config import load_engine_config
    from .engine import Engine

    return Engine(load_engine_config({
        "model": model_path, "threads": threads, "ctx": n_ctx, "kv_type": kv_type,
        "memory_budget": memory_budget, "max_tokens": max_tokens, "slots": 1,
        "model_backend": model_backend, "execution_provider": execution_provider,
        "timeout": math.inf, "index": index_path, "grounding": False if not ground else None}))


def ground_request(index_path, collection, no_ground) -> dict:
    """A request's grounding from the options: an index or a collection named
    on the command line insists on grounding; without them, it is used when there."""
    if no_ground:
        return {"ground": False}
    return {"ground": True if index_path or collection else None, "collection": collection}


def print_sources(result) -> None:
    """Where a grounded answer came from (retrieval's record, not the model's
    words), or that an answer is not from the manuals."""
    from .grounding.ground import UNGROUNDED
    from .grounding.prompt import source_label

    if result.grounding == UNGROUNDED:
        click.echo("(not from the manuals: no passage in them matched the question)")
    if result.sources:
        click.echo("Sources:")
        for n, hit in enumerate(result.sources, 1):
            click.echo(f"  [{n}] {hit.collection}/{source_label(hit)}")


def check_result(result) -> None:
    from .engine import OK

    if result.status != OK:
        raise EdgeSlmError(f"{result.status}: {result.error}")


@main.command()
@click.argument("question")
@engine_options
@sampling_options
@click.option("--system", default=None, help="System prompt (default: the model's own).")
@grounding_options
def ask(question, model_path, threads, n_ctx, kv_type, model_backend, execution_provider, memory_budget,
        system, max_tokens, stop, index_path, collection, no_ground, **sampling) -> None:
    """Answer QUESTION, streamed to stdout; from the manuals, when they are indexed."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    how = sampling_config(**sampling, default_temperature=0.2)
    with open_engine(model_path, threads, n_ctx, kv_type, memory_budget, max_tokens, model_backend,
                     execution_provider, index_path, ground=not no_ground) as engine:
        req = engine.submit(messages=messages, sampling=how, stop=stop,
                            **ground_request(index_path, collection, no_ground))
        streamed = False
        for piece in req.stream():
            stream_out(piece)
            streamed = True
        result = req.result()
    if streamed:
        stream_out("\n")
    check_result(result)
    print_sources(result)


@main.command()
@click.argument("text")
@engine_options
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print ids and text as JSON.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at end-of-generation tokens.")
def complete(text, model_path, threads, n_ctx, kv_type, model_backend, execution_provider, memory_budget,
             as_json, ignore_eos, max_tokens, stop, **sampling) -> None:
    """Continue raw TEXT (no chat template; greedy unless --temperature)."""
    how = sampling_config(**sampling, default_temperature=0.0, default_repeat_penalty=1.0)
    with open_engine(model_path, threads, n_ctx, kv_type, memory_budget, max_tokens, model_backend,
                     execution_provider) as engine:
        req = engine.submit(text, sampling=how, stop=stop, ignore_eos=ignore_eos)
        for piece in req.stream():
            if not as_json:
                stream_out(piece)
        result = req.result()
    check_result(result)
    if as_json:
        click.echo(json.dumps({"prompt_tokens": list(req.prompt), "tokens": result.tokens,
                               "text": result.text}, ensure_ascii=False))
    else:
        stream_out("\n")


@main.command()
@click.argument("text")
@model_option
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Taken like every model command's, so scripts can pass it to all; "
                   "tokenizing one text runs on one thread.")
@click.option("--json", "as_json", is_flag=True, help="Print the ids as a JSON list.")
def tokenize(text, model_path, threads, as_json) -> None:
    """Print the token ids of TEXT (BOS only if the model asks for it)."""
    from .backends import detect
    from .backends.sidecar import read_sidecar
    from .config import load_engine_config
    from .model import GGUFFile
    from .tokenizer import Tokenizer

    path = model_or_default(load_engine_config({"model": model_path}).model)
    kind = detect(path)  # the vocabulary alone: an ONNX or LiteRT model's is in its sidecar
    tok = Tokenizer.from_gguf(GGUFFile(path) if kind == "gguf" else read_sidecar(path, kind)[1])
    ids = tok.encode(text)
    click.echo(json.dumps(ids) if as_json else " ".join(map(str, ids)))


def parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    # ASCII digits only: int() would also take "1_000" and other scripts' digits
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise click.BadParameter(f"expected comma-separated token ids like 1,2,3, got {text!r}",
                                 param_hint="'--ids'")
    return [int(p) for p in parts]


@main.command()
@click.option("--ids", required=True, help="Comma-separated token ids, e.g. 1,2,3.")
@click.option("--npy", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .npy file: float32 [positions, vocab].")
@runtime_options
def logits(ids, out, model_path, threads, n_ctx, kv_type, model_backend, execution_provider) -> None:
    """Write the logits at every position of an id sequence."""
    import numpy as np

    from .backends import check_provider, load_source, prefill_in_chunks, resolve
    from .config import load_engine_config
    from .generate import check_ids
    from .model import RuntimeOptions

    check_writable(out)  # before loading and running the model, not after
    ecfg = load_engine_config({"model": model_path, "threads": threads, "kv_type": kv_type,
                               "model_backend": model_backend, "execution_provider": execution_provider})
    path = model_or_default(ecfg.model)
    check_provider(ecfg.execution_provider, resolve(path, ecfg.model_backend))
    model = load_source(path, ecfg.model_backend)
    vocab = model.config.vocab
    seq = check_ids(parse_ids(ids), vocab)
    limit = n_ctx or model.config.context_length
    if len(seq) > limit:
        raise ContextOverflow(f"{len(seq)} ids exceed the context of {limit} tokens"
                              + ("" if n_ctx else f" that {model.path.name} was trained for"))
    kv = ecfg.kv_type if ecfg.kv_type in model.kv_types else model.kv_types[0]
    opts = RuntimeOptions(n_threads=ecfg.threads, n_ctx=len(seq), kv_type=kv,
                          execution_provider=ecfg.execution_provider)
    values = prefill_in_chunks(model.runtime(opts), seq, opts.max_batch, all_logits=True)
    with output_file(out) as fh:
        np.save(fh, values)
    click.echo(f"{out}: {len(seq)} x {vocab} float32")


@main.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@backend_options
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=None,
              help="Context to size memory for (default: 2048 or the model's, if shorter).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default=None,
              help="KV cache element type (default f16).")
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--memory-budget", type=Size(), default=None,
              help="Plan slots and context within this many bytes, e.g. 256M.")
@click.option("--slots", type=click.IntRange(1, MAX_SLOTS), default=None, help="Slots wanted (default: the configured number, else 4).")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="Answer length the plan holds (default: the configured one, else 256).")
def info(path, model_path, model_backend, execution_provider, n_ctx, kv_type, threads, memory_budget,
         slots, max_tokens) -> None:
    """Describe a model (GGUF, ONNX or LiteRT) and the memory it needs (and the plan within a budget).

    The model is PATH or --model (default: the pulled one). A GGUF is read,
    not loaded; an ONNX or LiteRT model is loaded, to measure what it holds."""
    from .config import load_engine_config
    from .engine import load_and_plan

    if path and model_path and path != model_path:
        raise click.UsageError("give the model as PATH or --model, not both")
    ecfg = load_engine_config({"model": path or model_path, "memory_budget": memory_budget,
                               "slots": slots, "ctx": n_ctx, "kv_type": kv_type, "threads": threads,
                               "max_tokens": max_tokens, "model_backend": model_backend,
                               "execution_provider": execution_provider})
    model, grounder, plan = load_and_plan(ecfg)  # the plan counts the index the engine would open
    if grounder:
        grounder.close()
    f, cfg = model.file, model.config
    described = model.describe()
    ring = sliding_cache(cfg, plan.n_ctx, ecfg.max_batch) if cfg.swa_window and model.kind == "gguf" else ""
    lines = [
        *(f"{label:<13} {text}" for label, text in described[:1]),
        f"architecture  {f.get('general.architecture')} ({model.name})",
        f"layers        {cfg.n_layer}, width {cfg.dim}, FFN {cfg.hidden_dim}",
        f"heads         {cfg.n_head} query / {cfg.n_kv_head} KV, head size {cfg.head_dim}",
        f"vocabulary    {cfg.vocab} ({f.get('tokenizer.ggml.model', '?')})",
        f"context       {cfg.context_length} trained; RoPE base {cfg.rope_base:g}"
        + (f", scaled x{1 / cfg.rope_scale:g}" if cfg.rope_scale != 1 else "")
        + (", with per-dimension factors" if "rope_freqs.weight" in getattr(model, "tensors", {}) else ""),
        *([f"window        {cfg.swa_window} positions on {cfg.sliding_layers} of {cfg.n_layer} layers "
           f"(RoPE base {cfg.rope_base_swa:g}){ring}; "
           f"the others see the whole context"] if cfg.swa_window else []),
        *(f"{label:<13} {text}" for label, text in described[1:]),
    ]
    if ecfg.memory_budget is not None:
        lines.append(f"plan          {plan.summary()}")
    else:
        lines.append(f"memory for {plan.n_slots} slot(s) at context {plan.n_ctx}:")
    click.echo("\n".join(lines) + "\n" + plan.describe())


def sliding_cache(cfg, n_ctx: int, max_batch: int) -> str:
    """What the sliding-window layers cache at this context, in a few words."""
    from . import _core

    ring = _core.kv_ring(cfg.core(), n_ctx=n_ctx, max_batch=max_batch)
    return f", each caching a ring of {ring} positions" if ring else ""


@main.command()
@engine_options
@sampling_options
@click.option("--system", default=None, help="System prompt (default: the model's own).")
@click.option("--keep-turns", type=click.IntRange(0), default=0, show_default=True,
              help="Opening exchanges kept when the oldest make way for new ones "
                   "(while the question fits with them).")
@grounding_options
def chat(model_path, threads, n_ctx, kv_type, model_backend, execution_provider, memory_budget, system,
         keep_turns, max_tokens, stop, index_path, collection, no_ground, **sampling) -> None:
    """Chat in the terminal; the oldest turns make way when the context fills."""
    from .chat import Conversation

    if sys.stdin is None:  # fd 0 closed
        raise EdgeSlmError("standard input is closed: nothing to read questions from")
    if isinstance(sys.stdin, io.TextIOWrapper):
        # Bytes that are not UTF-8 reach the tokenizer, which refuses them in one
        # line and the chat goes on, whatever the locale's strictness.
        sys.stdin.reconfigure(errors="surrogateescape")
    how = sampling_config(**sampling, default_temperature=0.2)
    with open_engine(model_path, threads, n_ctx, kv_type, memory_budget, max_tokens, model_backend,
                     execution_provider, index_path, ground=not no_ground) as engine:
        talk = Conversation(engine, system=system, keep_turns=keep_turns, sampling=how,
                            stop=tuple(stop))
        click.echo("Type a question; an empty line or Ctrl-D ends the chat.")
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            try:
                result = talk.ask(line, on_text=stream_out,
                                  **ground_request(index_path, collection, no_ground))
                stream_out("\n")
                check_result(result)
                print_sources(result)
            except EdgeSlmError as e:  # say so and keep the chat going
                say(f"edge-slm: {e}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--to", "fmt", type=click.Choice(["onnx", "litert"]), required=True,
              help="onnx: a folder of model.onnx (4-bit weights as MatMulNBits), genai_config.json "
                   "and the tokenizer, for ONNX Runtime and onnxruntime-genai. litert: a .tflite "
                   "with prefill and decode signatures, for LiteRT with XNNPACK.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="LiteRT only: the converter's weight quantization.")
@click.option("--kv-len", type=click.IntRange(16, 1 << 16), default=None,
              help="LiteRT only: the KV cache length fixed in the file, the longest context it "
                   "runs (default 1024).")
@click.pass_context
def export(ctx, model_path, out, fmt, weights, kv_len) -> None:
    """Write MODEL (GGUF) in another runtime's format at OUT: a new or empty
    folder (onnx), a new NAME.tflite (litert). `--model OUT` then runs it.

    Needs the export-onnx or export-litert extra. A bad MODEL or OUT exits 2."""
    from .fleet.commands import progress_bar
    from .memory import MIB
    from .model import expected_tensors, load_model

    try:
        if fmt == "onnx":
            from .export.onnx import check_output_folder, export_onnx

            check_output_folder(out)  # before the model is read
        else:
            from .export.litert import DEFAULT_KV_LEN, check_output_file, export_litert

            check_output_file(out)
        if fmt == "onnx" and (kv_len is not None or weights != "int8"):
            raise EdgeSlmError("--weights and --kv-len are for --to litert; the ONNX export keeps "
                               "the GGUF's blocks and has no fixed cache length")
        model = load_model(model_path)
        total = sum(model.tensors[n].nbytes for n in expected_tensors(model.config, model.tensors))
        with progress_bar(total, "exporting") as update:
            if fmt == "onnx":
                done = export_onnx(model, out, update)
            else:
                done = export_litert(model, out, update, weights=weights, kv_len=kv_len or DEFAULT_KV_LEN)
    except EdgeSlmError as e:
        say(f"edge-slm: {e}")
        ctx.exit(2)
    if fmt == "litert":
        click.echo(f"{done.path}: {done.bytes / MIB:.1f} MiB, {done.weights} weights ({done.recipe}), "
                   f"KV {done.kv_len} positions, signatures {', '.join(done.signatures)}; "
                   f"sidecar {done.sidecar.name}")
        return
    click.echo(f"{done.folder}: {', '.join(done.files)} ({done.bytes / MIB:.1f} MiB)")
    for gguf_type, how in sorted(done.weight_types.items()):
        click.echo(f"  {gguf_type}: {how}")
    if done.note:
        click.echo(f"note: {done.note}")


from .soak import soak  # noqa: E402

main.add_command(soak)

from .bench import bench  # noqa: E402
main.add_command(bench)

from firmware_bridge.commands import mqtt_ask, serve  # noqa: E402
main.add_command(serve)
main.add_command(mqtt_ask)

from .grounding.commands import index  # noqa: E402
main.add_command(index)

from .kiosk.commands import kiosk  # noqa: E402
main.add_command(kiosk)

from .fleet.commands import flash, install, keygen, pack, rollback_command, status, verify  # noqa: E402
main.add_command(install)


@click.group(cls=Group)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def fleet(verbose: int) -> None:
    """Sign models into bundles and flash them onto boards: the operator's side."""
    setup_logging(verbose)


for command in (keygen, pack, verify, flash, status, rollback_command):
    fleet.add_command(command)
