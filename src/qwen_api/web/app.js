// The playground's behaviour: chat over POST /v1/chat/completions (streamed), n answers over POST /generate.
//
// Everything the model or a person writes reaches the page as text nodes (markdown.js builds the elements),
// never as HTML. The API key lives in this tab only (sessionStorage) and travels as an Authorization header,
// never in a URL. Stop aborts the fetch; the server notices the closed connection and cancels the request in
// the engine.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "qwen-api.playground.api-key";
  // `conversation` counts Clears: an answer still streaming when Clear is pressed belongs to the old conversation
  const state = { mode: "chat", model: null, history: [], controller: null, conversation: 0 };

  // ---- API key and the served model ------------------------------------------------------------------------

  function apiKey() {
    return $("api-key").value.trim();
  }

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  function rememberKey() {
    try {
      if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // Storage can be off (private modes); the key then lives in the field only.
    }
  }

  function restoreKey() {
    try {
      $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      $("api-key").value = "";
    }
  }

  function setKeyStatus(text, needed) {
    $("key-status").textContent = text;
    $("api-key").closest(".key").classList.toggle("needed", needed);
  }

  /** Asks GET /v1/models for the served model; returns null or a {title, detail} problem. */
  async function loadModel() {
    const name = $("model-name");
    let problem = null;
    try {
      const reply = await callServer("/v1/models");
      const response = reply.response;
      if (!reply.problem) {
        const data = await response.json();
        state.model = data.data?.[0]?.id ?? null;
        name.textContent = state.model ?? "(none)";
        setKeyStatus(apiKey() ? "key accepted" : "", false);
        return null;
      }
      problem = reply.problem;
      if (response.status === 401) {
        name.textContent = "(needs an API key)";
        setKeyStatus(apiKey() ? "wrong key" : "this server needs a key", true);
      } else {
        name.textContent = "(unavailable)";
      }
    } catch (err) {
      problem = unreachable(err);
      name.textContent = "(server unreachable)";
    }
    state.model = null;
    return problem;
  }

  // ---- errors ----------------------------------------------------------------------------------------------

  function detailText(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation list: [{loc: ["body", "field"], msg}, ...]
      return detail
        .map((d) => {
          const where = (d.loc || []).filter((part) => part !== "body").join(".");
          return where ? `${where}: ${d.msg}` : String(d.msg);
        })
        .join("; ");
    }
    return detail === undefined || detail === null ? "" : JSON.stringify(detail);
  }

  /** A readable {title, detail} from a status and an OpenAI ({error: {...}}) or seed ({detail}) body. */
  function describeError(status, body, retryAfter) {
    const error = body && typeof body.error === "object" ? body.error : null;
    const detail = error ? String(error.message ?? "") : detailText(body?.detail);
    const code = error?.code;
    let title;
    if (status === 401) {
      title = "Wrong or missing API key: enter the key this server was started with (top right).";
    } else if (status === 429) {
      const wait = retryAfter ? ` (the server suggests ${retryAfter} s)` : "";
      title = `The server is busy: all its slots are taken. Try again in a moment${wait}.`;
    } else if (status === 503) {
      title = "The model is not available right now: it is still loading, or the server is shutting down.";
    } else if (status === 504) {
      title = "The answer took longer than the server allows; it was cancelled.";
    } else if (status === 413) {
      title = "The request is larger than the server accepts.";
    } else if (code === "context_length_exceeded") {
      title = "Too long for the model's context: clear the chat, shorten the prompt, or lower Max tokens.";
    } else if (status === 400 || status === 422) {
      title = "The server refused these settings.";
    } else if (status === 404) {
      title = "Not found on this server.";
    } else if (status >= 500) {
      title = `The server failed (${status}).`;
    } else {
      title = `The server answered ${status}.`;
    }
    return { title, detail };
  }

  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    return describeError(response.status, body, response.headers.get("Retry-After"));
  }

  /** The problem to show when a request got no answer (the server is down, the connection broke). */
  function unreachable(err) {
    return { title: "Cannot reach the server.", detail: String(err.message || err) };
  }

  /**
   * Every request to this server, one way: the API key as a header, never from the browser's cache; with a
   * `body`, a POST of it as JSON (fields left undefined are left out). Resolves to {response, problem}: problem
   * is null for a 2xx answer, else the error body made readable ({title, detail}). Rejects when no answer came:
   * with an AbortError after Stop, else a network error (callers show `unreachable(err)`).
   */
  async function callServer(path, { body, signal } = {}) {
    const init = { headers: requestHeaders(), cache: "no-store", signal };
    if (body !== undefined) Object.assign(init, { method: "POST", body: JSON.stringify(body) });
    const response = await fetch(path, init);
    return { response, problem: response.ok ? null : await readError(response) };
  }

  function errorBox(problem) {
    const box = document.createElement("div");
    box.className = "error";
    box.setAttribute("role", "alert");
    const title = document.createElement("strong");
    title.textContent = problem.title;
    box.append(title);
    if (problem.detail) {
      const detail = document.createElement("div");
      detail.className = "error-detail";
      detail.textContent = problem.detail;
      box.append(detail);
    }
    return box;
  }

  // ---- server-sent events ----------------------------------------------------------------------------------

  /** Yields {event, data} for each event of a text/event-stream body. */
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end = buffer.indexOf("\n\n");
        while (end >= 0) {
          const raw = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = "message";
          const data = [];
          for (const line of raw.split("\n")) {
            if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            else if (line.startsWith("event:")) event = line.slice(6).trim();
          }
          if (data.length) yield { event, data: data.join("\n") };
          end = buffer.indexOf("\n\n");
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // ---- the chat ----------------------------------------------------------------------------------------------

  function numberField(id) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    return Number.isFinite(value) ? value : undefined;
  }

  function samplingFields() {
    return {
      temperature: numberField("temperature"),
      top_p: numberField("top-p"),
      top_k: numberField("top-k"),
      max_tokens: numberField("max-tokens"),
    };
  }

  function stopStrings() {
    return $("stop")
      .value.split("\n")
      .filter((s) => s.length > 0);
  }

  function scrollToEnd() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function addMessage(role) {
    $("chat-empty")?.remove();
    const message = document.createElement("article");
    message.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : state.model || "assistant";
    const content = document.createElement("div");
    content.className = "content";
    message.append(who, content);
    $("messages").append(message);
    return { message, content };
  }

  function addUserMessage(text) {
    const { content } = addMessage("user");
    content.textContent = text; // a prompt is shown exactly as typed, as text
    scrollToEnd();
  }

  /** The assistant's bubble: Markdown re-rendered at most once a frame while text streams in. */
  function addAssistantMessage() {
    const { message, content } = addMessage("assistant");
    message.classList.add("streaming");
    let text = "";
    let pending = false;
    const paint = () => {
      pending = false;
      content.replaceChildren(window.QwenMarkdown.render(text));
      scrollToEnd();
    };
    return {
      setText(value) {
        text = value;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      },
      finish(statsText, stopped) {
        message.classList.remove("streaming");
        if (stopped) message.classList.add("stopped");
        paint();
        if (statsText) {
          const stats = document.createElement("div");
          stats.className = "stats";
          stats.textContent = statsText;
          message.append(stats);
        }
        scrollToEnd();
      },
      fail(problem) {
        message.classList.remove("streaming");
        message.classList.add("failed");
        message.append(errorBox(problem));
        scrollToEnd();
      },
    };
  }

  function formatStats(t) {
    if (t.first === null) return t.stopped ? "stopped before the first token" : "";
    const parts = [`TTFT ${((t.first - t.start) / 1000).toFixed(2)} s`];
    const tokens = t.usageTokens ?? t.chunks;
    const approx = t.usageTokens === null ? "~" : "";
    parts.push(`${approx}${tokens} tokens`);
    const seconds = (t.end - t.first) / 1000;
    // Decode speed: the tokens after the first over the time since it came (the first token's time is TTFT).
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    if (t.finish) parts.push(`finish: ${t.finish}`);
    if (t.stopped) parts.push("stopped");
    return parts.join(" · ");
  }

  /** A message the server refused before answering goes back in the box, to be sent again, unless something else
   * was typed there meanwhile: it is not part of the conversation. */
  function giveBack(text) {
    if (!$("chat-input").value) $("chat-input").value = text;
  }

  async function sendChat(text) {
    const conversation = state.conversation;
    const problem = state.model ? null : await loadModel();
    if (problem || !state.model) {
      addUserMessage(text);
      addAssistantMessage().fail(problem || { title: "The server lists no model to talk to.", detail: "" });
      giveBack(text);
      return;
    }
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history, { role: "user", content: text });
    const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
    Object.assign(body, samplingFields());
    const seed = numberField("seed");
    if (seed !== undefined) body.seed = seed;
    const stop = stopStrings();
    if (stop.length) body.stop = stop;

    addUserMessage(text);
    const bubble = addAssistantMessage();
    const controller = new AbortController();
    setBusy(controller);
    const t = { start: performance.now(), first: null, end: null, chunks: 0, usageTokens: null };
    let answer = "";
    let failed = false;
    try {
      const reply = await callServer("/v1/chat/completions", { body, signal: controller.signal });
      if (reply.problem) {
        failed = true;
        bubble.fail(reply.problem);
        giveBack(text);
        return;
      }
      for await (const { data } of sseEvents(reply.response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failed = true;
          bubble.fail({ title: "The answer failed after it began.", detail: String(chunk.error.message ?? "") });
          continue;
        }
        if (chunk.usage) t.usageTokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta?.content;
          if (delta) {
            if (t.first === null) t.first = performance.now();
            t.chunks += 1;
            answer += delta;
            bubble.setText(answer);
          }
          if (choice.finish_reason) t.finish = choice.finish_reason;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") {
        t.stopped = true;
      } else {
        failed = true;
        bubble.fail(unreachable(err));
      }
    } finally {
      t.end = performance.now();
      setBusy(null);
      bubble.finish(failed ? "" : formatStats(t), t.stopped);
      const kept = !failed && answer && state.conversation === conversation; // not if Clear came meanwhile
      if (kept) state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    }
  }

  // ---- /generate: several answers side by side ----------------------------------------------------------------

  async function sendGenerate(prompt) {
    const fields = samplingFields();
    const body = {
      prompt,
      max_length: fields.max_tokens,
      temperature: fields.temperature,
      top_p: fields.top_p,
      top_k: fields.top_k,
      num_return_sequences: numberField("num-sequences"),
    };
    const results = $("generate-results");
    const status = $("generate-status");
    results.replaceChildren();
    status.textContent = "Generating…";
    const controller = new AbortController();
    setBusy(controller);
    const start = performance.now();
    try {
      const reply = await callServer("/generate", { body, signal: controller.signal });
      if (reply.problem) {
        status.textContent = "";
        results.append(errorBox(reply.problem));
        return;
      }
      const data = await reply.response.json();
      const seconds = ((performance.now() - start) / 1000).toFixed(2);
      const texts = data.generated_texts || [];
      status.textContent = `${texts.length} answer${texts.length === 1 ? "" : "s"} in ${seconds} s`;
      texts.forEach((text, i) => {
        const card = document.createElement("article");
        card.className = "answer";
        const head = document.createElement("div");
        head.className = "who";
        head.textContent = `Answer ${i + 1}`;
        const content = document.createElement("div");
        content.className = "content";
        content.append(window.QwenMarkdown.render(text));
        card.append(head, content);
        results.append(card);
      });
    } catch (err) {
      if (err.name === "AbortError") {
        status.textContent = "Stopped.";
      } else {
        status.textContent = "";
        results.append(errorBox(unreachable(err)));
      }
    } finally {
      setBusy(null);
    }
  }

  // ---- wiring ------------------------------------------------------------------------------------------------

  function setBusy(controller) {
    state.controller = controller;
    const busy = controller !== null;
    for (const id of ["send", "generate"]) $(id).disabled = busy;
    for (const id of ["stop-button", "generate-stop"]) $(id).disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function stop() {
    state.controller?.abort();
  }

  function setMode(mode) {
    state.mode = mode;
    const chat = mode === "chat";
    $("chat-view").hidden = !chat;
    $("generate-view").hidden = chat;
    $("tab-chat").classList.toggle("active", chat);
    $("tab-generate").classList.toggle("active", !chat);
    $("tab-chat").setAttribute("aria-pressed", String(chat));
    $("tab-generate").setAttribute("aria-pressed", String(!chat));
    for (const node of document.querySelectorAll(".chat-only")) node.hidden = !chat;
    for (const node of document.querySelectorAll(".generate-only")) node.hidden = chat;
  }

  function submitOnEnter(textarea, form) {
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }

  function init() {
    restoreKey();
    for (const [input, output] of [
      ["temperature", "temperature-value"],
      ["top-p", "top-p-value"],
    ]) {
      const show = () => ($(output).textContent = $(input).value);
      $(input).addEventListener("input", show);
      show();
    }
    $("api-key").addEventListener("input", rememberKey);
    $("api-key").addEventListener("change", loadModel);
    $("tab-chat").addEventListener("click", () => setMode("chat"));
    $("tab-generate").addEventListener("click", () => setMode("generate"));
    $("chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("chat-input").value;
      if (!text.trim() || state.controller) return;
      $("chat-input").value = "";
      sendChat(text);
    });
    $("generate-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("generate-input").value;
      if (!text.trim() || state.controller) return;
      sendGenerate(text);
    });
    submitOnEnter($("chat-input"), $("chat-form"));
    submitOnEnter($("generate-input"), $("generate-form"));
    $("stop-button").addEventListener("click", stop);
    $("generate-stop").addEventListener("click", stop);
    $("clear").addEventListener("click", () => {
      stop();
      state.history = [];
      state.conversation += 1;
      const empty = document.createElement("p");
      empty.id = "chat-empty";
      empty.className = "empty";
      empty.textContent = "Cleared. Ask something new.";
      $("messages").replaceChildren(empty);
    });
    setMode("chat");
    loadModel();
  }

  init();
})();
