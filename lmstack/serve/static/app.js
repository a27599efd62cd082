/*
 * lmstack web chat (served by `lmstack serve` at "/"): multi-turn chat over the server's own
 * OpenAI-compatible POST /v1/chat/completions with stream: true.
 *
 * - Streaming: the response body is read as server-sent events ("data: {...}" blocks ending in
 *   "data: [DONE]"); each delta is appended and the answer is re-rendered at most once per frame.
 * - Stop: aborts the fetch; the server notices the closed connection and frees the request. The
 *   partial answer stays in the conversation.
 * - Safety: model output (and user input) is turned into DOM nodes with createElement/textContent
 *   only. Nothing ever goes through innerHTML, so text such as <script> or <img onerror=...> is
 *   shown as text. Links are made only for http(s) URLs. The server's Content-Security-Policy
 *   (no inline script) backs this up.
 * - Markdown subset: fenced code blocks (also while still open during streaming), inline code,
 *   headings, bullet / numbered lists, block quotes, horizontal rules, **bold**, *italic*, [links](url).
 * - Settings (system prompt, temperature, top-p, max tokens, seed, API key) persist in localStorage.
 */
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system-prompt", "temperature", "top-p", "max-tokens", "seed", "api-key"];

const chat = {
  model: null,        // id from GET /v1/models
  history: [],        // [{role, content}] sent with every request (system prompt added at send time)
  controller: null,   // AbortController of the request in flight
};

// ------------------------------------------------------------------ safe markdown -> DOM

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function safeHref(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch (_) {
    return null;
  }
}

// Inline markup of one line of text -> array of nodes. Order matters: code spans first, so that
// markup characters inside them stay literal.
// Emphasis roughly as CommonMark has it: delimiters hug their text (no space inside), and underscores
// work only at word boundaries, so snake_case, __dunder__ names and <|token_names|> stay as they are.
const INLINE = new RegExp([
  /(`+)([\s\S]*?[^`])\1(?!`)/.source,                                                  // 1-2 code span
  /\*\*(?!\s)([^*]+?)(?<!\s)\*\*/.source,                                              // 3 strong
  /(?<![\p{L}\p{N}_])__(?![\s_])([^_]+?)(?<!\s)__(?![\p{L}\p{N}_])/.source,            // 4 strong
  /\*(?![\s*])([^*]+?)(?<!\s)\*/.source,                                               // 5 emphasis
  /(?<![\p{L}\p{N}_])_(?![\s_])([^_]+?)(?<!\s)_(?![\p{L}\p{N}_])/.source,              // 6 emphasis
  /\[([^\]]+)\]\(([^)\s]+)\)/.source,                                                  // 7-8 link
].join("|"), "gu");

function renderInline(text) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) nodes.push(el("code", "", m[2]));
    else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      strong.append(...renderInline(m[3] ?? m[4]));
      nodes.push(strong);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const em = el("em");
      em.append(...renderInline(m[5] ?? m[6]));
      nodes.push(em);
    } else {
      const href = safeHref(m[8]);
      if (href) {
        const a = el("a", "", m[7]);
        a.href = href;
        a.target = "_blank";
        a.rel = "noopener noreferrer nofollow";
        nodes.push(a);
      } else {
        nodes.push(document.createTextNode(m[0]));
      }
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let para = [];
  let list = null;

  const flushPara = () => {
    if (!para.length) return;
    const p = el("p");
    para.forEach((line, i) => {
      if (i) p.append(document.createTextNode("\n"));
      p.append(...renderInline(line));
    });
    out.append(p);
    para = [];
  };
  const flushList = () => { if (list) { out.append(list); list = null; } };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushPara(); flushList();
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      const pre = el("pre");
      if (fence[2]) pre.dataset.lang = fence[2];
      pre.append(el("code", "", body.join("\n")));
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
    if (heading) {
      flushPara(); flushList();
      const h = el(`h${heading[1].length}`);
      h.append(...renderInline(heading[2]));
      out.append(h);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flushPara(); flushList();
      out.append(el("hr"));
    } else if (bullet) {
      flushPara();
      const tag = /\d/.test(bullet[1]) ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) { flushList(); list = el(tag); }
      const li = el("li");
      li.append(...renderInline(bullet[2]));
      list.append(li);
    } else if (/^\s*>/.test(line)) {
      flushPara(); flushList();
      const quote = el("blockquote");
      quote.append(...renderInline(line.replace(/^\s*>\s?/, "")));
      out.append(quote);
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out;
}

// ------------------------------------------------------------------ transcript

function addMessage(role, text) {
  const node = el("div", `message ${role}`);
  node.dataset.role = role;
  if (role === "assistant") node.append(renderMarkdown(text));
  else node.textContent = text;
  $("transcript").append(node);
  scrollToEnd();
  return node;
}

function scrollToEnd() {
  const t = $("transcript");
  t.scrollTop = t.scrollHeight;
}

function setStatus(text) { $("status").textContent = text; }

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// ------------------------------------------------------------------ server calls

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      $("model-name").textContent = response.status === 401 ? "API key needed (Settings)" : await errorMessage(response);
      if (response.status === 401) showSettings(true);
      return;
    }
    const body = await response.json();
    chat.model = body.data[0].id;
    $("model-name").textContent = chat.model;
  } catch (err) {
    $("model-name").textContent = `server unreachable: ${err.message}`;
  }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history);
  const body = {
    model: chat.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// Yields the parsed JSON of each SSE "data:" event until [DONE]; returns true when [DONE] was seen.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") { yield { done: true }; return; }
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  if (!chat.model) await loadModel();
  if (!chat.model) { setStatus("No model: check the server and the API key in Settings."); return; }
  chat.history.push({ role: "user", content: text });
  addMessage("user", text);
  const node = addMessage("assistant", "");
  node.classList.add("streaming");
  let answer = "";
  let finish = null;
  let usage = null;
  let frame = 0;  // pending animation frame, 0 = none
  const started = performance.now();
  const render = () => {
    frame = 0;
    node.replaceChildren(renderMarkdown(answer));
    scrollToEnd();
  };

  chat.controller = new AbortController();
  setBusy(true);
  setStatus("generating…");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of readEvents(response)) {
      if (event.done) break;
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        if (!frame) frame = requestAnimationFrame(render);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    setStatus(tokens !== null
      ? `${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s), finish: ${finish}`
      : `done in ${seconds.toFixed(1)} s, finish: ${finish}`);
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
      setStatus("stopped");
    } else {
      finish = "error";
      addMessage("error", err.message).dataset.role = "error";
      setStatus("error");
    }
  } finally {
    cancelAnimationFrame(frame);
    render();
    node.classList.remove("streaming");
    node.dataset.finishReason = finish || "";
    if (finish === "stopped") node.append(el("span", "meta", "(stopped)"));
    if (answer || finish !== "error") chat.history.push({ role: "assistant", content: answer });
    else chat.history.pop(); // the request failed outright: forget the unanswered user turn
    chat.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

// ------------------------------------------------------------------ settings and wiring

function showSettings(show) {
  $("settings").hidden = !show;
  $("toggle-settings").setAttribute("aria-expanded", String(show));
}

function restoreSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem(`lmstack.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem(`lmstack.${id}`, $(id).value));
  }
  for (const id of ["temperature", "top-p"]) {
    const show = () => { $(`${id}-value`).textContent = $(id).value; };
    $(id).addEventListener("input", show);
    show();
  }
  $("api-key").addEventListener("change", loadModel);
}

function init() {
  restoreSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    $("transcript").replaceChildren();
    setStatus("");
  });
  $("toggle-settings").addEventListener("click", () => showSettings($("settings").hidden));
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
