// The playground: the hosted playground's controls over this server's own /v1 API. No other host is contacted.
"use strict";

const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty", "best_of"];
const SAVED = [...SLIDERS, "stop_seqs", "seed", "show_probs", "system", "prompt"];
const state = { mode: "complete", model: null, context: 0, controller: null, turns: [], savedMaxTokens: false,
                key: null };
// What the page keeps in the browser's localStorage: settings, the prompt and the chat (STORE), the API key (KEY_STORE);
// with "Remember" off only REMEMBER = "off" is kept (docs/security.md).
const STORE = "gpt-playground", KEY_STORE = "gpt-playground-key", REMEMBER = "gpt-playground-remember";
const TOO_LONG = "The prompt is too long";

function remembering() { return $("remember").checked; }

function save() {
  if (!remembering()) return;
  const s = { mode: state.mode, turns: state.turns };
  for (const id of SAVED) s[id] = $(id).value;
  localStorage.setItem(STORE, JSON.stringify(s));
}

function load() {
  $("remember").checked = localStorage.getItem(REMEMBER) !== "off";
  state.key = localStorage.getItem(KEY_STORE);
  let s = {};
  try { s = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { s = {}; }
  for (const id of SAVED) if (s[id] !== undefined) $(id).value = s[id];
  state.savedMaxTokens = s.max_tokens !== undefined;
  state.turns = Array.isArray(s.turns) ? s.turns : [];
  setMode(s.mode === "chat" ? "chat" : "complete");
}

function setRemember() {
  // Off: clear what this page stored and store nothing more (the key is kept in this tab only); on: store again.
  if (remembering()) {
    localStorage.removeItem(REMEMBER);
    if (state.key) localStorage.setItem(KEY_STORE, state.key);
    save();
    return;
  }
  localStorage.removeItem(STORE);
  localStorage.removeItem(KEY_STORE);
  localStorage.setItem(REMEMBER, "off");
}

function unescape(text) {
  return text.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function call(path, body, signal) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const r = await fetch(path, { method: body ? "POST" : "GET", headers: headers(), signal,
                                  body: body ? JSON.stringify(body) : undefined });
    if (r.status === 401 && attempt === 0) {
      const key = window.prompt("This server needs an API key:");
      if (!key) return r;
      state.key = key;
      if (remembering()) localStorage.setItem(KEY_STORE, key);
      continue;
    }
    return r;
  }
}

function request() {
  const stops = $("stop_seqs").value.split("\n").filter((s) => s.length).map(unescape).slice(0, 4);
  const body = { model: state.model, temperature: +$("temperature").value, top_p: +$("top_p").value,
                 frequency_penalty: +$("frequency_penalty").value, presence_penalty: +$("presence_penalty").value };
  const bestOf = +$("best_of").value;
  if (stops.length) body.stop = stops;
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  const probs = $("show_probs").value !== "off";
  if (state.mode === "complete") {
    Object.assign(body, { prompt: $("prompt").value, max_tokens: +$("max_tokens").value });
    if (bestOf > 1) body.best_of = bestOf;
    if (probs) body.logprobs = 5;
    body.stream = bestOf === 1;
    return ["/v1/completions", body];
  }
  Object.assign(body, { messages: messages(), max_tokens: +$("max_tokens").value, stream: true });
  if (probs) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  return ["/v1/chat/completions", body];
}

function messages() {
  const out = [];
  if ($("system").value.trim()) out.push({ role: "system", content: $("system").value });
  for (const t of state.turns) out.push({ role: t.role, content: t.content });
  return out;
}

// ---------------------------------------------------------------- rendering tokens with probabilities

function shade(p) {
  const mode = $("show_probs").value;
  if (mode === "off") return "";
  if (mode === "likely") return `rgba(40, 160, 80, ${(0.15 + 0.6 * p).toFixed(3)})`;
  if (mode === "unlikely") return `rgba(220, 60, 60, ${(0.15 + 0.6 * (1 - p)).toFixed(3)})`;
  return `hsla(${Math.round(120 * p)}, 70%, 55%, 0.55)`;
}

function tokenSpan(text, logprob, alts) {
  const span = document.createElement("span");
  span.className = "gen";
  span.textContent = text;
  if (logprob !== undefined && logprob !== null) {
    const p = Math.exp(logprob);
    span.classList.add("tok");
    span.tabIndex = 0;
    span.dataset.p = p.toFixed(4);
    span.dataset.alts = JSON.stringify(alts || []);
    span.style.background = shade(p);
    span.setAttribute("aria-label", `${JSON.stringify(text)} probability ${(100 * p).toFixed(2)}%`);
  }
  return span;
}

function showPanel(ev) {
  const t = ev.target.closest(".tok");
  const panel = $("prob-panel");
  if (!t) { panel.hidden = true; return; }
  const alts = JSON.parse(t.dataset.alts);
  panel.innerHTML = "";
  const head = document.createElement("div");
  head.textContent = `${JSON.stringify(t.textContent)}: ${(100 * +t.dataset.p).toFixed(2)}%`;
  panel.appendChild(head);
  const list = document.createElement("ul");
  for (const [tok, lp] of alts) {
    const li = document.createElement("li");
    li.textContent = `${JSON.stringify(tok)}  ${(100 * Math.exp(lp)).toFixed(2)}%`;
    list.appendChild(li);
  }
  panel.appendChild(list);
  const r = t.getBoundingClientRect();
  panel.style.left = `${Math.min(r.left, window.innerWidth - 260) + window.scrollX}px`;
  panel.style.top = `${r.bottom + window.scrollY + 4}px`;
  panel.hidden = false;
}

// ---------------------------------------------------------------- streaming

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function legacyPieces(lp) {
  if (!lp) return null;
  return lp.tokens.map((t, i) => [t, lp.token_logprobs[i], Object.entries(lp.top_logprobs[i] || {})]);
}

function chatPieces(lp) {
  if (!lp || !lp.content) return null;
  return lp.content.map((e) => [e.token, e.logprob, e.top_logprobs.map((a) => [a.token, a.logprob])]);
}

function appendPieces(target, text, pieces) {
  // Text held back at a possible stop sequence arrives later without log-probs: plain span then.
  if (pieces && pieces.length) {
    for (const [tok, lp, alts] of pieces) target.appendChild(tokenSpan(tok, lp, alts));
    return;
  }
  if (text) target.appendChild(tokenSpan(text));
}

async function submit() {
  if (state.controller) return;
  status("checking the prompt...");  // at once, so a stale "done" is never read as this run's
  if (state.mode === "chat") {
    const text = $("user-input").value;
    if (text.trim()) { state.turns.push({ role: "user", content: text }); $("user-input").value = ""; }
  }
  const [path, body] = request();
  if (!(await fits())) return;
  save();
  state.controller = new AbortController();
  $("stop").disabled = false;
  $("submit").disabled = true;
  status("generating...");
  let target;
  if (state.mode === "complete") {
    const out = $("output");
    out.innerHTML = "";
    const p = document.createElement("span");
    p.className = "prompt-text";
    p.textContent = body.prompt;
    out.appendChild(p);
    target = out;
  } else {
    state.turns.push({ role: "assistant", content: "" });
    renderTurns();
    target = $("turns").lastElementChild.querySelector(".reply");
  }
  try {
    const r = await call(path, body, state.controller.signal);
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${r.status}`);
    }
    if (!body.stream) {
      const data = await r.json();
      const c = data.choices[0];
      appendPieces(target, c.text, legacyPieces(c.logprobs));
      status(`done (${c.finish_reason})`);
    } else {
      let reason = "", released = "";
      for await (const chunk of events(r)) {
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          const text = state.mode === "complete" ? c.text : (c.delta && c.delta.content) || "";
          released += text;
          appendPieces(target, text, state.mode === "complete" ? legacyPieces(c.logprobs) : chatPieces(c.logprobs));
          if (state.mode === "chat") state.turns[state.turns.length - 1].content += text;
          if (c.finish_reason) reason = c.finish_reason;
        }
      }
      trimTo(target, released);
      status(`done (${reason})`);
    }
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : "error: " + e.message);
  } finally {
    state.controller = null;
    $("stop").disabled = true;
    $("submit").disabled = false;
    if (state.mode === "chat") { syncTurnText(); save(); }
  }
}

function trimTo(target, released) {
  // Tokens shown with their probabilities may run past a stop sequence the server cut: drop them.
  const spans = [...target.querySelectorAll(".gen")];
  let shown = spans.map((s) => s.textContent).join("");
  while (spans.length && shown.length > released.length) {
    const last = spans.pop();
    shown = shown.slice(0, shown.length - last.textContent.length);
    last.remove();
  }
}

function syncTurnText() {
  const items = $("turns").querySelectorAll("li");
  items.forEach((li, i) => { if (state.turns[i]) li.querySelector("textarea").value = state.turns[i].content; });
}

function regenerate() {
  if (state.mode === "chat") {
    while (state.turns.length && state.turns[state.turns.length - 1].role === "assistant") state.turns.pop();
    renderTurns();
  }
  submit();
}

function renderTurns() {
  const list = $("turns");
  list.innerHTML = "";
  state.turns.forEach((t, i) => {
    const li = document.createElement("li");
    li.className = "turn " + t.role;
    const label = document.createElement("label");
    label.textContent = t.role === "user" ? "User" : "Assistant";
    label.htmlFor = `turn-${i}`;
    const area = document.createElement("textarea");
    area.id = `turn-${i}`;
    area.value = t.content;
    area.rows = 2;
    area.addEventListener("input", () => { t.content = area.value; save(); });
    const reply = document.createElement("div");
    reply.className = "reply";  // the streamed, shaded reply; the textarea (editable) shows when it is empty
    const edit = document.createElement("button");
    edit.type = "button";
    edit.textContent = "Edit";
    edit.setAttribute("aria-label", `Edit turn ${i + 1}`);
    edit.addEventListener("click", () => { reply.innerHTML = ""; area.focus(); });
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete turn ${i + 1}`);
    del.addEventListener("click", () => { state.turns.splice(i, 1); renderTurns(); save(); });
    li.append(label, reply, area, edit, del);
    list.appendChild(li);
  });
}

// ---------------------------------------------------------------- counts, code, mode

async function fits() {
  // Prompt tokens + Maximum length must fit the context: say so here, before the server's 400.
  const [, body] = request();
  const r = await call("/tokenize", state.mode === "complete" ? { prompt: body.prompt } : { messages: body.messages });
  if (!r || !r.ok) return true;
  const n = (await r.json()).count;
  const max = +$("max_tokens").value, room = state.context - n;
  $("count").textContent = `${n} prompt tokens / ${state.context} context`;
  if (n + max > state.context) {
    status(`${TOO_LONG}: ${n} prompt tokens + ${max} Maximum length exceed the ${state.context}-token context. ` +
           (room > 0 ? `Shorten the prompt or lower Maximum length to ${room}.`
                     : "Shorten the prompt: it leaves no room for Maximum length."));
    return false;
  }
  if ($("status").textContent.startsWith(TOO_LONG)) status("");
  return true;
}

function fitContext(context) {
  // The Maximum length slider spans the model's context (less one prompt token); a fresh page, or one whose
  // saved value does not fit this model, starts at min(256, context / 2).
  state.context = context;
  const slider = $("max_tokens"), max = Math.max(1, context - 1);
  const keep = state.savedMaxTokens && +slider.value <= max ? slider.value : null;
  slider.max = max;
  slider.value = keep !== null ? keep : Math.max(1, Math.min(256, Math.floor(context / 2)));
  showValues();
}

function showValues() {
  for (const id of SLIDERS) $(id + "-v").textContent = $(id).value;
}

function viewCode() {
  const [path, body] = request();
  const json = JSON.stringify(body, null, 2);
  const origin = window.location.origin;
  $("code-curl").textContent = `curl ${origin}${path} \\\n  -H "Content-Type: application/json" \\\n` +
    `  -H "Authorization: Bearer $GPT_API_KEY" \\\n  -d '${json.replace(/'/g, "'\\''")}'`;
  const method = path === "/v1/completions" ? "completions" : "chat.completions";
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${pyValue(v)},`).join("\n");
  $("code-python").textContent = `from openai import OpenAI\n\nclient = OpenAI(base_url="${origin}/v1", ` +
    `api_key="YOUR_KEY")\nresponse = client.${method}.create(\n${args}\n)\n`;
  $("code-dialog").showModal();
}

function pyValue(v) {
  if (v === true) return "True";
  if (v === false) return "False";
  if (v === null) return "None";
  if (Array.isArray(v)) return "[" + v.map(pyValue).join(", ") + "]";
  if (typeof v === "object") return "{" + Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyValue(x)}`).join(", ") + "}";
  return JSON.stringify(v);
}

function setMode(mode) {
  state.mode = mode;
  $("complete-pane").hidden = mode !== "complete";
  $("chat-pane").hidden = mode !== "chat";
  $("mode-complete").setAttribute("aria-selected", mode === "complete");
  $("mode-chat").setAttribute("aria-selected", mode === "chat");
  if (mode === "chat") renderTurns();
}

function status(text) { $("status").textContent = text; }

async function init() {
  load();
  for (const id of SLIDERS) $(id).addEventListener("input", () => { showValues(); save(); });
  showValues();
  for (const id of ["stop_seqs", "seed", "show_probs", "system", "prompt"]) $(id).addEventListener("change", save);
  $("mode-complete").addEventListener("click", () => { setMode("complete"); save(); });
  $("mode-chat").addEventListener("click", () => { setMode("chat"); save(); });
  $("remember").addEventListener("change", setRemember);
  $("submit").addEventListener("click", submit);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("view-code").addEventListener("click", viewCode);
  $("code-close").addEventListener("click", () => $("code-dialog").close());
  document.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(); });
  for (const ev of ["mouseover", "focusin"]) document.addEventListener(ev, showPanel);
  for (const id of ["prompt", "max_tokens"]) {
    $(id).addEventListener("input", () => { clearTimeout(state.timer); state.timer = setTimeout(fits, 300); });
  }
  const r = await call("/v1/models");
  if (r && r.ok) {
    const m = (await r.json()).data[0];
    const context = m.max_model_len || m.context_length;
    state.model = m.id;
    fitContext(context);
    $("model-name").textContent = `${m.id} (${context}-token context)`;
    fits();
  }
}

init();
