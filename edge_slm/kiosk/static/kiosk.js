// The kiosk page. Everything the server sends is put on the page as text
// (textContent, never HTML), so markup in a question or a manual shows as
// written and never runs.
"use strict";

const $ = (id) => document.getElementById(id);
const STATUS_EVERY_MS = 2000;
const LABELS = {
  grounded: "Based on the manual passages below: check them before you act",
  not_covered: "Not in the manuals",
  ungrounded: "Not from the manuals: the model's own answer, unchecked",
};
const FAILURES = {
  busy: "The board is answering other questions.",
  too_long: "The question is too long for the model.",
  timeout: "The answer took too long and was cut short.",
  cancelled: "Stopped.",
  error: "The question could not be answered.",
};

let current = null;   // {id, controller} of the question being answered
let collectionsShown = "";
const history = [];   // this session's questions and answers

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function mib(bytes) {
  return `${Math.round(bytes / 1048576)} MiB`;
}

// ---- the board's state ----

async function refreshStatus() {
  try {
    const r = await fetch("/api/status", {cache: "no-store"});
    if (r.status === 401) { showLogin(); return; }
    const s = await r.json();
    const memory = s.memory.budget ? `${mib(s.memory.rss)} of ${mib(s.memory.budget)}` : mib(s.memory.rss);
    const load = `${s.slots_busy} of ${s.slots} answering` + (s.queue_depth ? `, ${s.queue_depth} waiting` : "");
    $("board").textContent = `${s.model} · memory ${memory} · ${load}`;
    showCollections(s.collections);
    if (!current) {
      // the kiosk's own share taken: a question now is refused, so say so and wait
      $("send").disabled = s.kiosk_busy;
      const message = s.kiosk_busy ? "The kiosk is answering other questions; ask again in a moment."
        : s.slots_busy >= s.slots ? "The board is busy answering others; your question will wait its turn." : "";
      $("busy").hidden = !message;
      $("busy").textContent = message;
    }
  } catch (e) {
    $("board").textContent = "The board does not answer.";
  }
}

function showCollections(names) {
  const key = names.join("\n");
  if (key === collectionsShown) return;
  collectionsShown = key;
  const select = $("collection");
  const chosen = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const name of names) select.add(new Option(name, name));
  select.value = names.includes(chosen) ? chosen : "";
  select.hidden = names.length < 2;
}

// ---- login, when the kiosk is reached over the network ----

function showLogin() {
  $("login").hidden = false;
  $("ask").hidden = true;
  $("pin").focus();
}

async function login(event) {
  event.preventDefault();
  const r = await fetch("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify({pin: $("pin").value})});
  if (r.ok) {
    $("login").hidden = true;
    $("ask").hidden = false;
    $("login-error").textContent = "";
    refreshStatus();
  } else {
    $("login-error").textContent = (await r.json()).message;
  }
}

// ---- asking ----

function highlighted(text, terms) {
  // The passage as text nodes, with the question's words marked: a word is
  // marked when it starts with a term (the index matched stems too).
  const out = document.createDocumentFragment();
  const words = terms.filter((t) => t.length > 1).map((t) => t.toLowerCase());
  const parts = text.split(/([\p{L}\p{N}]+(?:[-./_][\p{L}\p{N}]+)*)/u);
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i];
    const lower = part.toLowerCase();
    if (i % 2 === 1 && words.some((w) => lower === w || (w.length > 3 && lower.startsWith(w)))) {
      out.append(el("mark", part));
    } else if (part) {
      out.append(document.createTextNode(part));
    }
  }
  return out;
}

function showSources(sources, terms) {
  const list = $("sources");
  list.replaceChildren();
  sources.forEach((s, i) => {
    const where = [s.file, s.heading, s.page ? `page ${s.page}` : null].filter(Boolean).join(" · ");
    const item = el("li");
    const button = el("button", `[${i + 1}] ${s.collection}: ${where}`);
    button.type = "button";
    button.setAttribute("aria-expanded", "false");
    const passage = el("div", undefined, "passage");
    passage.hidden = true;
    passage.append(highlighted(s.passage, terms));
    button.addEventListener("click", () => {
      passage.hidden = !passage.hidden;
      button.setAttribute("aria-expanded", String(!passage.hidden));
    });
    item.append(button, passage);
    list.append(item);
    if (i === 0) button.click();  // the best passage, open: what the answer should say
  });
}

function setLabel(grounding) {
  const label = $("label");
  label.className = `label ${grounding || ""}`;
  label.textContent = grounding ? LABELS[grounding] || "" : "";
}

function setAnswering(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  $("question").readOnly = on;
}

async function* events(response) {
  // Server-sent events from a fetch body: "event: NAME\ndata: JSON\n\n".
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield [name, JSON.parse(data)];
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || current) return;
  const controller = new AbortController();
  current = {id: null, controller};
  setAnswering(true);
  $("answer").hidden = false;
  $("text").textContent = "";
  $("meta").textContent = "";
  $("sources").replaceChildren();
  setLabel(null);
  const entry = {question, text: "", sources: [], terms: [], grounding: null, status: null};
  try {
    const body = {question};
    if ($("collection").value) body.collection = $("collection").value;
    const r = await fetch("/api/ask", {method: "POST", signal: controller.signal,
                                       headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)});
    if (!r.ok) {  // refused before it reached the model: not part of the history
      if (r.status === 401) showLogin();
      const refusal = await r.json();
      $("answer").hidden = true;
      $("busy").hidden = false;
      $("busy").textContent = refusal.message;
      return;
    }
    for await (const [name, data] of events(r)) {
      if (name === "start") {
        current.id = data.id;
        const waiting = data.slots_busy >= data.slots;
        $("busy").hidden = !waiting;
        $("busy").textContent = waiting
          ? `The board is answering ${data.slots_busy} other question(s); yours is next in line.` : "";
        $("text").textContent = "Looking in the manuals and thinking…";
      } else if (name === "sources") {
        entry.grounding = data.grounding;
        entry.sources = data.sources;
        entry.terms = data.terms;
        setLabel(data.grounding);
        showSources(data.sources, data.terms);
      } else if (name === "text") {
        $("busy").hidden = true;
        entry.text += data.text;
        entry.status = entry.status || "answering";
        $("text").textContent = entry.text;
      } else if (name === "done") {
        entry.status = data.status;
        entry.grounding = data.grounding || entry.grounding;
        setLabel(entry.grounding);
        $("busy").hidden = true;
        const failure = data.status === "ok" ? "" : `${FAILURES[data.status] || data.status}` +
          (data.retry_after_s ? ` Try again in ${Math.ceil(data.retry_after_s)} s.` : "");
        const timing = data.first_token_ms === null ? "" :
          `first words after ${(data.first_token_ms / 1000).toFixed(1)} s, ${data.answer_tokens} tokens in ` +
          `${(data.total_ms / 1000).toFixed(1)} s`;
        $("meta").textContent = [failure, timing].filter(Boolean).join(" ");
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("meta").textContent = "The connection to the board was lost.";
    else $("meta").textContent = FAILURES.cancelled;
    entry.status = entry.status || "cancelled";
  } finally {
    current = null;
    setAnswering(false);
    if (entry.status) remember(entry);
    if ($("text").textContent === "Looking in the manuals and thinking…") $("text").textContent = "";
    refreshStatus();
  }
}

async function stop() {
  if (!current) return;
  const {id, controller} = current;
  // Cancel in the engine first (its slot is freed at the next step), then stop reading.
  if (id) {
    try {
      await fetch("/api/cancel", {method: "POST", headers: {"Content-Type": "application/json"},
                                  body: JSON.stringify({id})});
    } catch (e) { /* the abort below still ends the request on the server */ }
  }
  controller.abort();
}

function remember(entry) {
  history.unshift(entry);
  $("history-section").hidden = false;
  const item = el("li");
  const button = el("button", entry.question);
  button.type = "button";
  button.addEventListener("click", () => {
    $("answer").hidden = false;
    $("question").value = entry.question;
    $("text").textContent = entry.text;
    setLabel(entry.grounding);
    showSources(entry.sources, entry.terms);
    $("meta").textContent = "";
  });
  item.append(button);
  $("history").prepend(item);
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  $("login").addEventListener("submit", login);
  $("stop").addEventListener("click", stop);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  refreshStatus();
  setInterval(refreshStatus, STATUS_EVERY_MS);
  $("question").focus();
});
