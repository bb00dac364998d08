// xllm web chat: plain JavaScript, no dependencies. Talks to the server's own POST /chat
// (multipart, stream=true) and reads the SSE reply with fetch + ReadableStream.
//
// History: every request carries the whole conversation as `messages` (JSON [{role, content}]),
// and names every file attached so far, in order, by its media handle: each file is uploaded once
// (POST v1/files) and later turns send only its id (`file_id`), so the server decodes and encodes
// it once. Each user turn's files are bound explicitly by `<image>` / `<audio>` / `<video>`
// placeholders written before its text (or where the user typed them), so every file binds to
// the turn it was attached to.
"use strict";

(() => {
  const KINDS = ["image", "audio", "video"];
  const PLACEHOLDER = /<(image|audio|video)>/g;
  const EXTENSIONS = {
    image: ["png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff", "heic", "heif", "avif"],
    audio: ["wav", "mp3", "flac", "ogg", "oga", "opus", "m4a", "aac", "weba", "aif", "aiff"],
    video: ["mp4", "m4v", "mov", "webm", "mkv", "avi", "mpg", "mpeg", "ts", "flv", "wmv"],
  };
  const TITLES = {
    400: "Bad request",
    401: "API key required",
    404: "Not found",
    413: "Too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "The server is busy",
    500: "Server error",
    503: "Unavailable",
    504: "Timed out",
  };
  const SETTINGS_KEY = "xllm.settings";
  const API_KEY_KEY = "xllm.apiKey";

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    newChat: $("new-chat"),
    settings: $("settings"),
    apiKeyRow: $("api-key-row"),
    apiKey: $("api-key"),
    ignoreEos: $("ignore-eos"),
    main: $("main"),
    log: $("log"),
    empty: $("empty"),
    form: $("composer"),
    formError: $("form-error"),
    attachments: $("attachments"),
    prompt: $("prompt"),
    fileInput: $("file-input"),
    attach: $("attach"),
    record: $("record"),
    recordLabel: $("record-label"),
    recordTime: $("record-time"),
    stop: $("stop"),
    send: $("send"),
    drop: $("drop-overlay"),
  };
  // form field -> input element (empty input: the model's default is used)
  const NUMBERS = {
    temperature: $("temperature"),
    max_tokens: $("max-tokens"),
    top_p: $("top-p"),
    top_k: $("top-k"),
    seed: $("seed"),
  };

  const state = {
    turns: [], // {role: "user"|"assistant", text, files: [{kind, blob, name, url}]}
    pending: [], // files attached to the next message
    controller: null, // AbortController of the running request
    recorder: null, // {recorder, stream, timer, discard, done: Promise}
    chat: 0, // bumped by "New chat": a request of an earlier chat no longer touches the state
  };

  // ---------------------------------------------------------------- settings and API key
  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {};
    } catch {
      saved = {};
    }
    for (const [name, input] of Object.entries(NUMBERS)) {
      if (typeof saved[name] === "string") input.value = saved[name];
    }
    el.ignoreEos.checked = saved.ignore_eos === true;
    try {
      el.apiKey.value = sessionStorage.getItem(API_KEY_KEY) || "";
    } catch {
      /* storage disabled: the key lives in the field only */
    }
    if (el.apiKey.value) el.apiKeyRow.hidden = false;
  }

  function saveSettings() {
    const values = { ignore_eos: el.ignoreEos.checked };
    for (const [name, input] of Object.entries(NUMBERS)) values[name] = input.value;
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
    } catch {
      /* not persisted */
    }
  }

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function askForApiKey() {
    el.apiKeyRow.hidden = false;
    el.settings.open = true;
  }

  // ---------------------------------------------------------------- server status
  let statusTimer = null;

  function setStatus(text, bad = false) {
    el.status.textContent = text;
    el.status.classList.toggle("bad", bad);
  }

  async function checkServer() {
    clearTimeout(statusTimer);
    try {
      const ready = await fetch("ready", { cache: "no-store" });
      if (!ready.ok) {
        const body = await ready.json().catch(() => ({}));
        const why = body.status || `HTTP ${ready.status}`;
        setStatus(why === "loading" ? "the model is loading…" : `not ready: ${why}`, why !== "loading");
        statusTimer = setTimeout(checkServer, 2000);
        return;
      }
      const models = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
      if (models.status === 401) {
        askForApiKey();
        setStatus(el.apiKey.value ? "the API key was refused" : "this server needs an API key", true);
        return;
      }
      const body = await models.json().catch(() => ({}));
      const name = body.data && body.data[0] ? body.data[0].id : "model";
      setStatus(`ready · ${name}`);
    } catch {
      setStatus("cannot reach the server", true);
      statusTimer = setTimeout(checkServer, 3000);
    }
  }

  // ---------------------------------------------------------------- attachments
  function kindOf(file) {
    const major = (file.type || "").split("/")[0];
    if (KINDS.includes(major)) return major;
    const ext = (file.name || "").split(".").pop().toLowerCase();
    return KINDS.find((kind) => EXTENSIONS[kind].includes(ext)) || null;
  }

  function addFiles(files) {
    const refused = [];
    for (const file of files) {
      const kind = kindOf(file);
      if (!kind) {
        refused.push(file.name || "a file");
        continue;
      }
      addAttachment(kind, file, file.name || `${kind}`);
    }
    if (refused.length) showFormError(`Not an image, audio or video file: ${refused.join(", ")}`);
    else clearFormError();
  }

  function addAttachment(kind, blob, name) {
    state.pending.push({ kind, blob, name, url: URL.createObjectURL(blob) });
    renderAttachments();
  }

  function preview(file) {
    let node;
    if (file.kind === "image") {
      node = document.createElement("img");
      node.alt = file.name;
    } else {
      node = document.createElement(file.kind);
      node.controls = true;
      node.preload = "metadata";
      if (file.kind === "video") {
        node.muted = true;
        node.playsInline = true;
      }
      node.setAttribute("aria-label", `${file.kind}: ${file.name}`);
    }
    node.src = file.url;
    node.title = file.name;
    return node;
  }

  function renderAttachments() {
    el.attachments.replaceChildren(
      ...state.pending.map((file, index) => {
        const item = document.createElement("li");
        item.className = "attachment";
        item.dataset.kind = file.kind;
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = file.name;
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "✕";
        remove.setAttribute("aria-label", `Remove ${file.name}`);
        remove.addEventListener("click", () => {
          const [gone] = state.pending.splice(index, 1);
          URL.revokeObjectURL(gone.url);
          renderAttachments();
          el.prompt.focus();
        });
        item.append(preview(file), name, remove);
        return item;
      }),
    );
  }

  // ---------------------------------------------------------------- recording
  async function toggleRecording() {
    if (state.recorder) {
      state.recorder.recorder.stop();
      return;
    }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.MediaRecorder) {
      showFormError(
        "Recording needs a browser with MediaRecorder and a secure page (https, or localhost).",
      );
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      showFormError(`The microphone is not available: ${err.message || err.name}`);
      return;
    }
    clearFormError();
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    const started = Date.now();
    const rec = { recorder, stream, discard: false, timer: null, done: null };
    rec.done = new Promise((resolve) => {
      recorder.addEventListener("dataavailable", (event) => {
        if (event.data && event.data.size) chunks.push(event.data);
      });
      recorder.addEventListener("stop", () => {
        stream.getTracks().forEach((track) => track.stop());
        clearInterval(rec.timer);
        state.recorder = null;
        el.record.classList.remove("recording");
        el.recordLabel.textContent = "Record";
        el.recordTime.textContent = "";
        if (!rec.discard && chunks.length) {
          const type = recorder.mimeType || chunks[0].type || "audio/webm";
          const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
          const stamp = new Date().toTimeString().slice(0, 8).replaceAll(":", "");
          addAttachment("audio", new Blob(chunks, { type }), `recording-${stamp}.${ext}`);
        }
        resolve();
      });
    });
    state.recorder = rec;
    recorder.start(250);
    el.record.classList.add("recording");
    el.recordLabel.textContent = "Stop recording";
    const tick = () => {
      const s = Math.floor((Date.now() - started) / 1000);
      el.recordTime.textContent = `● ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    };
    tick();
    rec.timer = setInterval(tick, 500);
  }

  async function finishRecording(discard = false) {
    const rec = state.recorder;
    if (!rec) return;
    rec.discard = discard;
    if (rec.recorder.state !== "inactive") rec.recorder.stop();
    await rec.done;
  }

  // ---------------------------------------------------------------- conversation view
  function scrollToEnd(force = false) {
    const m = el.main;
    if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 80) m.scrollTop = m.scrollHeight;
  }

  function addBubble(role, text, files = []) {
    el.empty.hidden = true;
    const item = document.createElement("li");
    item.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "xllm";
    item.append(who);
    if (files.length) {
      const media = document.createElement("div");
      media.className = "media";
      media.append(...files.map(preview));
      item.append(media);
    }
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    item.append(body);
    el.log.append(item);
    scrollToEnd(true);
    return item;
  }

  function setMeta(item, text) {
    let meta = item.querySelector(".meta");
    if (!meta) {
      meta = document.createElement("span");
      meta.className = "meta";
      item.append(meta);
    }
    meta.textContent = text;
  }

  function addError(item, message) {
    const error = document.createElement("p");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.textContent = message;
    item.append(error);
    scrollToEnd(true);
  }

  function showFormError(message) {
    el.formError.textContent = message;
    el.formError.hidden = false;
  }

  function clearFormError() {
    el.formError.hidden = true;
    el.formError.textContent = "";
  }

  // ---------------------------------------------------------------- requests
  function countPlaceholders(text) {
    const counts = { image: 0, audio: 0, video: 0 };
    for (const match of text.matchAll(PLACEHOLDER)) counts[match[1]] += 1;
    return counts;
  }

  /** The turn's text for `messages`: one placeholder per attached file, before the text unless
   * the user wrote them in it. Assistant text never binds media (placeholders are broken up). */
  function content(turn) {
    if (turn.role !== "user") return turn.text.replace(PLACEHOLDER, "<\u200b$1>");
    const written = countPlaceholders(turn.text);
    let prefix = "";
    for (const file of turn.files) {
      if (written[file.kind] > 0) written[file.kind] -= 1;
      else prefix += `<${file.kind}>`;
    }
    if (!prefix) return turn.text;
    return turn.text ? `${prefix}\n${turn.text}` : prefix;
  }

  function placeholderProblem(text, files) {
    const written = countPlaceholders(text);
    for (const kind of KINDS) {
      const have = files.filter((file) => file.kind === kind).length;
      if (written[kind] > have) {
        return (
          `The message has ${written[kind]} <${kind}> placeholder(s) but ${have} ${kind} ` +
          `file(s) attached. Attach more, or remove the placeholder.`
        );
      }
    }
    return null;
  }

  /** Upload each file not uploaded yet (POST v1/files); it is named by its id from then on. */
  async function uploadFiles(turns, signal) {
    for (const turn of turns) {
      for (const file of turn.files) {
        if (file.id) continue;
        const form = new FormData();
        form.append("file", file.blob, file.name);
        form.append("purpose", "user_data");
        const response = await fetch("v1/files", {
          method: "POST",
          body: form,
          headers: authHeaders(),
          signal,
        });
        if (!response.ok) throw await httpError(response);
        file.id = (await response.json()).id;
      }
    }
  }

  /** Delete a finished conversation's handles (nothing waits for it). */
  function forgetFiles(turns) {
    for (const turn of turns) {
      for (const file of turn.files) {
        if (!file.id) continue;
        const url = `v1/files/${encodeURIComponent(file.id)}`;
        fetch(url, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
        file.id = null;
      }
    }
  }

  function buildForm(turns) {
    const form = new FormData();
    form.append(
      "messages",
      JSON.stringify(turns.map((turn) => ({ role: turn.role, content: content(turn) }))),
    );
    for (const turn of turns) {
      for (const file of turn.files) form.append("file_id", file.id);
    }
    form.append("stream", "true");
    for (const [name, input] of Object.entries(NUMBERS)) {
      if (input.value.trim() !== "") form.append(name, input.value.trim());
    }
    if (el.ignoreEos.checked) form.append("ignore_eos", "true");
    return form;
  }

  class ApiError extends Error {
    constructor(status, message, type, retryAfter) {
      super(message);
      this.status = status;
      this.type = type;
      this.retryAfter = retryAfter;
    }

    describe() {
      const title = TITLES[this.status] || "Error";
      let text = `${title} (${this.status}): ${this.message}`;
      if (this.retryAfter) text += ` — try again in ${this.retryAfter} s.`;
      if (this.status === 401) text += " Enter the API key in Settings.";
      return text;
    }
  }

  async function httpError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const error = (body && body.error) || {};
    const message = error.message || response.statusText || "the request failed";
    return new ApiError(response.status, message, error.type, response.headers.get("Retry-After"));
  }

  /** Read the SSE stream: onDelta(text) per event; resolves with the last event (usage). */
  async function readStream(response, onDelta) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const boundary = /\r?\n\r?\n/;
    let buffer = "";
    let last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = boundary.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return last;
        const event = JSON.parse(data);
        if (event.error) {
          const e = event.error;
          throw new ApiError(e.code || 500, e.message || "generation failed", e.type, null);
        }
        if (event.delta) onDelta(event.delta);
        if (event.finish_reason) last = event;
      }
    }
    throw new Error("the connection closed before the answer was complete");
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.hidden = !busy;
    if (!busy && document.activeElement === document.body) el.prompt.focus();
  }

  function restoreComposer(turn) {
    if (!el.prompt.value.trim()) el.prompt.value = turn.text;
    state.pending = [...turn.files, ...state.pending];
    renderAttachments();
  }

  async function send() {
    if (state.controller) return;
    if (state.recorder) await finishRecording();
    const text = el.prompt.value;
    const files = state.pending;
    if (!text.trim() && !files.length) {
      el.prompt.focus();
      return;
    }
    const problem = placeholderProblem(text, files);
    if (problem) {
      showFormError(problem);
      return;
    }
    clearFormError();
    const user = { role: "user", text: text.trim() ? text : "", files };
    state.pending = [];
    renderAttachments();
    el.prompt.value = "";
    state.turns.push(user);
    const userItem = addBubble("user", user.text, files);

    const answer = { role: "assistant", text: "", files: [] };
    const item = addBubble("assistant", "");
    item.classList.add("streaming");
    item.setAttribute("aria-busy", "true");
    const body = item.querySelector(".text");
    const textNode = document.createTextNode("");
    body.append(textNode);

    const controller = new AbortController();
    const chat = state.chat;
    state.controller = controller;
    setBusy(true);
    const started = performance.now();
    let error = null;
    let stopped = false;
    let last = null;
    const post = async () => {
      await uploadFiles(state.turns, controller.signal);
      return fetch("chat", {
        method: "POST",
        body: buildForm(state.turns),
        headers: authHeaders(),
        signal: controller.signal,
      });
    };
    try {
      let response = await post();
      if (response.status === 404) {
        // A handle is gone (expired, or the server restarted): upload the files again, once.
        for (const turn of state.turns) turn.files.forEach((file) => (file.id = null));
        response = await post();
      }
      if (!response.ok) throw await httpError(response);
      last = await readStream(response, (delta) => {
        answer.text += delta;
        textNode.appendData(delta);
        scrollToEnd();
      });
    } catch (err) {
      if (err.name === "AbortError") stopped = true;
      else error = err;
    } finally {
      item.classList.remove("streaming");
      item.setAttribute("aria-busy", "false");
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }

    if (chat !== state.chat) return; // "New chat" was pressed meanwhile
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    let message = null;
    if (error instanceof ApiError) message = error.describe();
    else if (error instanceof SyntaxError) {
      message = `Unreadable reply from the server: ${error.message}`;
    }
    else if (error) {
      message =
        `Network error: ${error.message}. Is the server running? (A body over the server's ` +
        "--max-upload-mb limit can also end the connection.)";
    }
    if (error instanceof ApiError && error.status === 401) {
      askForApiKey();
      el.apiKey.focus();
    }
    if (!answer.text) {
      // Nothing came back: the turn is not part of the conversation; put it back in the box.
      state.turns.pop();
      userItem.classList.add("failed");
      setMeta(userItem, "not sent — it is back in the message box");
      item.remove();
      restoreComposer(user);
      if (message) addError(userItem, message);
      return;
    }
    state.turns.push(answer);
    if (stopped) {
      setMeta(item, `stopped · ${seconds} s`);
    } else if (message) {
      addError(item, `The answer ended early. ${message}`);
    } else if (last && last.usage) {
      const reason = last.finish_reason === "length" ? " · reached max tokens" : "";
      setMeta(item, `${last.usage.completion_tokens} tokens · ${seconds} s${reason}`);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    state.chat += 1;
    stop();
    state.controller = null;
    setBusy(false);
    finishRecording(true);
    forgetFiles(state.turns);
    for (const turn of state.turns) turn.files.forEach((file) => URL.revokeObjectURL(file.url));
    state.pending.forEach((file) => URL.revokeObjectURL(file.url));
    state.turns = [];
    state.pending = [];
    renderAttachments();
    el.log.replaceChildren();
    el.empty.hidden = false;
    el.prompt.value = "";
    clearFormError();
    el.prompt.focus();
  }

  // ---------------------------------------------------------------- drag and drop, paste
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");

  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    el.drop.hidden = false;
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.drop.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.drop.hidden = true;
    addFiles(event.dataTransfer.files);
    el.prompt.focus();
  });
  el.prompt.addEventListener("paste", (event) => {
    const files = event.clipboardData ? [...event.clipboardData.files] : [];
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  // ---------------------------------------------------------------- wiring
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      if (!state.controller) send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) {
      event.preventDefault();
      stop();
    }
  });
  el.stop.addEventListener("click", () => {
    stop();
    el.prompt.focus();
  });
  el.newChat.addEventListener("click", newChat);
  $("settings-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in a settings field: keep the page, apply the API key
    saveApiKey();
  });
  el.attach.addEventListener("click", () => el.fileInput.click());
  el.fileInput.addEventListener("change", () => {
    addFiles(el.fileInput.files);
    el.fileInput.value = "";
    el.prompt.focus();
  });
  el.record.addEventListener("click", toggleRecording);
  for (const input of [...Object.values(NUMBERS), el.ignoreEos]) {
    input.addEventListener("change", saveSettings);
  }
  function saveApiKey() {
    try {
      if (el.apiKey.value.trim()) sessionStorage.setItem(API_KEY_KEY, el.apiKey.value.trim());
      else sessionStorage.removeItem(API_KEY_KEY);
    } catch {
      /* not persisted */
    }
    checkServer();
  }
  el.apiKey.addEventListener("change", saveApiKey);

  loadSettings();
  checkServer();
  el.prompt.focus();
})();
