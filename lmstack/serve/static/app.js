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
 * - Models: GET /v1/models lists the base and any LoRA adapters the server has; a selector picks one.
 * - Feedback (only when the server was started with --feedback FILE, as /health says): the Feedback
 *   button switches to pair mode, where each message asks for n=2 samples shown side by side and the
 *   person picks the better one (a preference pair; the pick continues the conversation). In either mode
 *   a finished reply can be rated (thumbs up / down) or edited (the edit becomes "chosen", the original
 *   "rejected"). Each judgement is POSTed to /v1/feedback with the prompt the reply answered, the model
 *   and the sampling settings; the server appends it to its feedback file.
 * - Tools (only when the server was started with --tools, as GET /v1/tools says): the Tools switch
 *   sends the server's tools with each request, with tool_choice from the select next to it ("auto":
 *   the model decides; "required": the first reply must call one, later ones decide). Streamed tool-call
 *   deltas are put together by index; each call is run through POST /v1/tools/{name} and shown as a
 *   collapsible box (name, arguments, result); the assistant turn with tool_calls and the tool turns go
 *   into the history and the conversation continues until a reply without calls, at most
 *   MAX_TOOL_ROUNDS rounds (the round after the last offers tool_choice "none"). Not in feedback mode.
 */
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system-prompt", "temperature", "top-p", "max-tokens", "seed", "api-key"];

const chat = {
  model: null,        // id from GET /v1/models (the base or an adapter)
  history: [],        // [{role, content}] sent with every request (system prompt added at send time)
  controller: null,   // AbortController of the request in flight
  feedback: false,    // whether the server collects feedback (/health)
  pairMode: false,    // feedback mode: two replies per message, pick one
  pendingPair: false, // two replies wait for the person's pick before the conversation goes on
  tools: [],          // the server's built-in tools (GET /v1/tools), as OpenAI function definitions
  toolsOn: false,     // the Tools switch: offer them to the model and run the calls it makes
};
const MAX_TOOL_ROUNDS = 4;  // tool rounds per message; the round after the last one offers no tools

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
    const ids = body.data.map((m) => m.id);
    const saved = localStorage.getItem("lmstack.model");
    chat.model = ids.includes(chat.model) ? chat.model : (ids.includes(saved) ? saved : ids[0]);
    const select = $("model-select");
    select.replaceChildren(...ids.map((id) => { const option = el("option", "", id); option.value = id; return option; }));
    select.value = chat.model;
    select.hidden = ids.length < 2;
    $("model-name").textContent = chat.model;
    await loadFeedback();
    await loadTools();
  } catch (err) {
    $("model-name").textContent = `server unreachable: ${err.message}`;
  }
}

async function loadFeedback() {
  let enabled = false;
  try {
    const response = await fetch("/health");
    enabled = response.ok && (await response.json()).feedback === true;
  } catch (_) { /* no health: no feedback */ }
  chat.feedback = enabled;
  $("toggle-feedback").hidden = !enabled;
  if (!enabled) setPairMode(false);
}

function setPairMode(on) {
  chat.pairMode = on;
  $("toggle-feedback").setAttribute("aria-pressed", String(on));
  document.body.dataset.mode = on ? "pair" : "chat";
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
  if (chat.pendingPair) { setStatus("Pick the better of the two replies first (or start a new chat)."); return; }
  chat.history.push({ role: "user", content: text });
  addMessage("user", text);
  const pair = chat.pairMode;
  const useTools = chat.toolsOn && !pair && chat.tools.length > 0;
  chat.controller = new AbortController();
  setBusy(true);
  try {
    for (let round = 0; ; round++) {
      const body = requestBody();
      if (pair) body.n = 2;
      if (useTools) {
        body.tools = chat.tools;
        // "required" forces the first reply to call a tool; after that the model decides, and the last
        // round allowed offers no tools so that the conversation ends with an answer
        body.tool_choice = round >= MAX_TOOL_ROUNDS ? "none" : (round === 0 ? $("tool-choice").value : "auto");
      }
      const reply = await streamReply(body, pair);
      if (!reply.toolCalls.length || reply.finish) break;
      if (!(await runToolCalls(reply))) break;
    }
  } finally {
    chat.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

// One request: streams the reply (or two, in pair mode) into new transcript nodes, then records it.
// Returns {toolCalls, finish, node, answer}: the calls of a "tool_calls" reply, still to be run.
async function streamReply(body, pair) {
  // what a judgement of these replies records: the conversation they answer, the model, the sampling
  const context = {
    model: body.model,
    prompt: body.messages.map((m) => ({ role: m.role, content: m.content || "" })),
    sampling: { temperature: body.temperature, top_p: body.top_p, max_tokens: body.max_tokens,
                seed: body.seed === undefined ? null : body.seed },
  };
  let nodes;
  if (pair) {
    const box = el("div", "pair");
    nodes = [0, 1].map(() => {
      const option = el("div", "pair-option");
      const node = el("div", "message assistant");
      node.dataset.role = "assistant";
      option.append(node);
      box.append(option);
      return node;
    });
    $("transcript").append(box);
  } else {
    nodes = [addMessage("assistant", "")];
  }
  nodes.forEach((node) => node.classList.add("streaming"));
  const answers = nodes.map(() => "");
  const finishes = nodes.map(() => null);
  const calls = [];   // tool calls of the first choice, assembled from their deltas by index
  let finish = null;  // "stopped" | "error" for the whole request
  let usage = null;
  let frame = 0;  // pending animation frame, 0 = none
  const started = performance.now();
  const render = () => {
    frame = 0;
    nodes.forEach((node, i) => node.replaceChildren(renderMarkdown(answers[i])));
    scrollToEnd();
  };

  setStatus("generating…");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of readEvents(response)) {
      if (event.done) break;
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const i = choice.index || 0;
        if (i >= nodes.length) continue;
        if (choice.delta && choice.delta.content) {
          answers[i] += choice.delta.content;
          if (!frame) frame = requestAnimationFrame(render);
        }
        for (const piece of (choice.delta && choice.delta.tool_calls) || []) {
          if (i !== 0) continue;
          const call = calls[piece.index] || (calls[piece.index] = { id: "", name: "", arguments: "" });
          if (piece.id) call.id = piece.id;
          if (piece.function && piece.function.name) call.name = piece.function.name;
          if (piece.function && piece.function.arguments) call.arguments += piece.function.arguments;
        }
        if (choice.finish_reason) finishes[i] = choice.finish_reason;
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    const reasons = finishes.join(", ");
    setStatus(tokens !== null
      ? `${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s), finish: ${reasons}`
      : `done in ${seconds.toFixed(1)} s, finish: ${reasons}`);
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
    nodes.forEach((node, i) => {
      node.classList.remove("streaming");
      node.dataset.finishReason = finish || finishes[i] || "";
      if (finish === "stopped") node.append(el("span", "meta", "(stopped)"));
    });
  }
  const toolCalls = finishes[0] === "tool_calls" && !finish ? calls.filter(Boolean) : [];
  const answered = answers.some((a) => a) || finish !== "error" || toolCalls.length;
  if (!answered) {
    if (chat.history.at(-1).role === "user") chat.history.pop(); // failed outright: forget the unanswered turn
  } else if (toolCalls.length) {
    nodes[0].classList.add("tool-round");
    chat.history.push({ role: "assistant", content: answers[0] || null, tool_calls: toolCalls.map((c) => ({
      id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } })) });
  } else if (pair) {
    offerPair(nodes, answers, context);
  } else {
    chat.history.push({ role: "assistant", content: answers[0] });
    if (chat.feedback && answers[0].trim()) addReplyFeedback(nodes[0], context, chat.history.length - 1);
  }
  return { toolCalls, finish, node: nodes[0] };
}

// ------------------------------------------------------------------ tools

async function loadTools() {
  let tools = [];
  try {
    const response = await fetch("/v1/tools", { headers: headers() });
    if (response.ok) tools = (await response.json()).data || [];
  } catch (_) { /* no tools */ }
  chat.tools = tools;
  $("toggle-tools").hidden = !tools.length;
  $("toggle-tools").title = tools.length
    ? `Let the model call the server's tools: ${tools.map((t) => t.function.name).join(", ")}` : "";
  if (!tools.length) setToolsOn(false);
}

function setToolsOn(on) {
  chat.toolsOn = on;
  $("toggle-tools").setAttribute("aria-pressed", String(on));
  $("tool-choice").hidden = !on;
}

// Runs the calls of one reply through the server's built-in tools, one collapsible box per call, and
// appends the tool turns; false when the person stopped it.
async function runToolCalls(reply) {
  let box = reply.node;
  for (const call of reply.toolCalls) {
    const details = el("details", "tool-call");
    details.dataset.name = call.name;
    const summary = el("summary", "", `tool call: ${call.name}`);
    const result = el("pre", "tool-result", "running…");
    details.append(summary, el("div", "tool-label", "arguments"), el("pre", "tool-arguments", call.arguments),
                   el("div", "tool-label", "result"), result);
    box.after(details);
    box = details;
    scrollToEnd();
    setStatus(`running tool ${call.name}…`);
    let content;
    try {
      const response = await fetch(`/v1/tools/${encodeURIComponent(call.name)}`, {
        method: "POST", headers: headers(), body: call.arguments || "{}", signal: chat.controller.signal,
      });
      content = response.ok ? (await response.json()).content : `error: ${await errorMessage(response)}`;
    } catch (err) {
      if (err.name === "AbortError") { result.textContent = "(stopped)"; setStatus("stopped"); return false; }
      content = `error: ${err.message}`;
    }
    result.textContent = content;
    details.dataset.done = "true";
    chat.history.push({ role: "tool", tool_call_id: call.id, content });
  }
  return true;
}

// ------------------------------------------------------------------ feedback

async function postFeedback(judgement) {
  try {
    const response = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(judgement) });
    if (!response.ok) throw new Error(await errorMessage(response));
    setStatus(`feedback saved (${judgement.kind})`);
    return true;
  } catch (err) {
    setStatus(`feedback not saved: ${err.message}`);
    return false;
  }
}

// Two replies side by side: the pick is saved as a pair and continues the conversation.
function offerPair(nodes, answers, context) {
  if (answers[0] === answers[1] || !answers[0].trim() || !answers[1].trim()) {
    // nothing to compare (identical or empty): the first reply goes on, no judgement is recorded
    chat.history.push({ role: "assistant", content: answers[0] });
    nodes[1].classList.add("rejected");
    setStatus("the two replies are identical or one is empty: nothing to compare (raise the temperature)");
    return;
  }
  chat.pendingPair = true;
  const buttons = nodes.map((node, i) => {
    const button = el("button", "choose", "This one is better");
    button.type = "button";
    button.addEventListener("click", async () => {
      buttons.forEach((b) => { b.disabled = true; });
      const saved = await postFeedback({ kind: "pair", model: context.model, prompt: context.prompt,
                                         chosen: answers[i], rejected: answers[1 - i], sampling: context.sampling });
      if (!saved) { buttons.forEach((b) => { b.disabled = false; }); return; }
      buttons.forEach((b) => b.remove());
      node.classList.add("chosen");
      nodes[1 - i].classList.add("rejected");
      chat.history.push({ role: "assistant", content: answers[i] });
      chat.pendingPair = false;
      $("prompt").focus();
    });
    node.parentElement.append(button);
    return button;
  });
}

// Thumbs up / down and Edit under one finished reply.
function addReplyFeedback(node, context, historyIndex) {
  const bar = el("div", "feedback-bar");
  const up = el("button", "rate-up", "👍");
  const down = el("button", "rate-down", "👎");
  const edit = el("button", "edit", "Edit");
  up.title = "A good reply";
  down.title = "A bad reply";
  edit.title = "Rewrite this reply into a better one (saved as chosen over the original)";
  for (const [button, label] of [[up, true], [down, false]]) {
    button.type = "button";
    button.addEventListener("click", async () => {
      up.disabled = down.disabled = true;
      const saved = await postFeedback({ kind: "rating", model: context.model, prompt: context.prompt,
                                         completion: chat.history[historyIndex].content, label,
                                         sampling: context.sampling });
      if (saved) bar.dataset.rated = label ? "up" : "down";
      else up.disabled = down.disabled = false;
    });
  }
  edit.type = "button";
  edit.addEventListener("click", () => editReply(node, bar, context, historyIndex));
  bar.append(up, down, edit);
  node.after(bar);
}

function editReply(node, bar, context, historyIndex) {
  const original = chat.history[historyIndex].content;
  const box = el("textarea", "edit-box");
  box.value = original;
  box.rows = Math.min(12, Math.max(3, original.split("\n").length + 1));
  const save = el("button", "save-edit", "Save edit");
  const cancel = el("button", "cancel-edit", "Cancel");
  save.type = cancel.type = "button";
  const close = (text) => {
    node.replaceChildren(renderMarkdown(text));
    bar.hidden = false;
  };
  cancel.addEventListener("click", () => close(chat.history[historyIndex].content));
  save.addEventListener("click", async () => {
    const edited = box.value.trim();
    if (!edited || edited === original.trim()) { setStatus("the edit changes nothing: not saved"); return; }
    save.disabled = true;
    const saved = await postFeedback({ kind: "edit", model: context.model, prompt: context.prompt,
                                       chosen: edited, rejected: original, sampling: context.sampling });
    save.disabled = false;
    if (!saved) return;
    chat.history[historyIndex].content = edited;  // the conversation goes on from the better reply
    node.dataset.edited = "true";
    close(edited);
  });
  bar.hidden = true;
  node.replaceChildren(box, el("div", "edit-actions"));
  node.lastChild.append(save, cancel);
  box.focus();
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
    chat.pendingPair = false;
    $("transcript").replaceChildren();
    setStatus("");
  });
  $("toggle-settings").addEventListener("click", () => showSettings($("settings").hidden));
  $("toggle-feedback").addEventListener("click", () => setPairMode(!chat.pairMode));
  $("toggle-tools").addEventListener("click", () => setToolsOn(!chat.toolsOn));
  $("model-select").addEventListener("change", () => {
    chat.model = $("model-select").value;
    $("model-name").textContent = chat.model;
    localStorage.setItem("lmstack.model", chat.model);
  });
  setPairMode(false);
  setToolsOn(false);
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
