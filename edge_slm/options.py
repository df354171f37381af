"""Command-line options more than one command takes: edge-slm's own
(edge_slm/cli.py) and the MQTT service's (firmware_bridge/commands.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .backends import BACKENDS, EXECUTION_PROVIDERS
from .errors import EdgeSlmError
from .memory import parse_size


class Size(click.ParamType):
    """A memory size like 256M, refused as a bad option value (exit 2) like any other."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        try:
            return parse_size(value)
        except EdgeSlmError as e:
            self.fail(str(e), param, ctx)


def model_option(f):
    return click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
                        help="GGUF file, ONNX model folder or .tflite file (default: the pulled "
                             "SmolLM2-135M).")(f)


def runtime_options(f):
    f = click.option("--threads", type=click.IntRange(1, 256), default=None,
                     help="Threads for the forward pass (default: the configured number, "
                          "else all CPUs).")(f)
    f = click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=None,
                     help="Context length in tokens (default: 2048 or the model's, if shorter).")(f)
    f = click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default=None,
                     help="KV cache element type (default: the configured one, else f16; "
                          "the ONNX and LiteRT backends hold f32).")(f)
    return backend_options(f)


def backend_options(f):
    """What runs the model, and on what; and the model."""
    f = click.option("--backend", "model_backend", type=click.Choice(BACKENDS), default=None,
                     help="What runs the model (default: auto, by the file: our C kernels for "
                          "GGUF, ONNX Runtime for an ONNX folder, LiteRT for .tflite).")(f)
    f = click.option("--execution-provider", type=click.Choice(EXECUTION_PROVIDERS), default=None,
                     help="Where ONNX Runtime runs the model (default cpu; cuda and tensorrt need "
                          "onnxruntime-gpu, as on a Jetson).")(f)
    return model_option(f)


def engine_options(f):
    """The runtime options, and the one setting that bounds the process."""
    f = click.option("--memory-budget", type=Size(), default=None,
                     help="Ceiling for the whole process, e.g. 256M (default: the configured "
                          "one, else none); the context is sized to fit.")(f)
    return runtime_options(f)


def grounding_options(f):
    """How a chat command grounds its answers in the manuals' index."""
    f = click.option("--no-ground", "no_ground", is_flag=True,
                     help="Answer without the manuals, even when there is an index.")(f)
    f = click.option("--collection", default=None,
                     help="Search only this collection of manuals (default: all).")(f)
    return click.option("--index", "index_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help="Index of manuals (default: $EDGE_SLM_HOME/index.sqlite3, "
                                           "used when it exists).")(f)
