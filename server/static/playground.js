// chatserve playground: a conversation editor and one or two response panes that talk to this
// server's own /v1 API. Plain browser JavaScript, no dependencies, no build step.
"use strict";

(() => {
  const API = "/v1";
  const KEY_STORAGE = "chatserve.apiKey";          // sessionStorage only: gone when the tab closes
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // ------------------------------------------------------------------ state
  const state = {
    messages: [
      newMessage("system", "You are a helpful assistant."),
      newMessage("user", ""),
    ],
    models: [],
    modelsError: null,
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    needsKey: false,
    compare: false,
    panes: [],
  };

  function newMessage(role, content = "") {
    return { role, content, images: [], tool_calls: null, tool_call_id: "" };
  }

  function authHeaders() {
    return state.key ? { Authorization: `Bearer ${state.key}` } : {};
  }

  // ------------------------------------------------------------------ small helpers
  function fmtMs(ms) {
    if (ms == null || !Number.isFinite(ms)) return "–";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  // "\n", "\t", "\\" typed in a one-line field mean the characters
  function unescapeField(s) {
    return s.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
  }

  async function readError(res) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    const e = (body && body.error) || {};
    return {
      status: res.status,
      message: e.message || (typeof body === "object" && body && body.detail) || res.statusText || "request failed",
      code: e.code || null,
      param: e.param || null,
    };
  }

  // ------------------------------------------------------------------ JSON schema sanity check
  // Catches what would make the server's 400 (or a silent surprise) before anything is sent: not JSON,
  // not a schema, unknown types, required names that are not properties, bad regexes, dangling $refs.
  const TYPES = new Set(["object", "array", "string", "number", "integer", "boolean", "null"]);

  function checkSchema(schema, root = schema, path = "$") {
    const problems = [];
    const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
    if (typeof schema === "boolean") return problems;
    if (!isObj(schema)) return [`${path}: a schema must be an object (or true/false)`];
    const sub = (v, p) => problems.push(...checkSchema(v, root, p));
    if ("type" in schema) {
      const types = Array.isArray(schema.type) ? schema.type : [schema.type];
      for (const t of types) {
        if (!TYPES.has(t)) problems.push(`${path}.type: unknown type ${JSON.stringify(t)}`);
      }
    }
    if ("properties" in schema) {
      if (!isObj(schema.properties)) problems.push(`${path}.properties: must be an object`);
      else for (const [k, v] of Object.entries(schema.properties)) sub(v, `${path}.properties.${k}`);
    }
    if ("required" in schema) {
      if (!Array.isArray(schema.required) || schema.required.some((r) => typeof r !== "string")) {
        problems.push(`${path}.required: must be an array of property names`);
      } else if (isObj(schema.properties)) {
        for (const r of schema.required) {
          if (!(r in schema.properties)) problems.push(`${path}.required: ${JSON.stringify(r)} is not a property`);
        }
      }
    }
    if ("items" in schema) {
      if (Array.isArray(schema.items)) schema.items.forEach((v, i) => sub(v, `${path}.items[${i}]`));
      else sub(schema.items, `${path}.items`);
    }
    if ("prefixItems" in schema) {
      if (!Array.isArray(schema.prefixItems)) problems.push(`${path}.prefixItems: must be an array`);
      else schema.prefixItems.forEach((v, i) => sub(v, `${path}.prefixItems[${i}]`));
    }
    if ("additionalProperties" in schema && typeof schema.additionalProperties !== "boolean") {
      sub(schema.additionalProperties, `${path}.additionalProperties`);
    }
    for (const k of ["anyOf", "oneOf", "allOf"]) {
      if (!(k in schema)) continue;
      if (!Array.isArray(schema[k]) || !schema[k].length) problems.push(`${path}.${k}: must be a non-empty array`);
      else schema[k].forEach((v, i) => sub(v, `${path}.${k}[${i}]`));
    }
    for (const k of ["$defs", "definitions"]) {
      if (!(k in schema)) continue;
      if (!isObj(schema[k])) problems.push(`${path}.${k}: must be an object`);
      else for (const [name, v] of Object.entries(schema[k])) sub(v, `${path}.${k}.${name}`);
    }
    if ("enum" in schema && (!Array.isArray(schema.enum) || !schema.enum.length)) {
      problems.push(`${path}.enum: must be a non-empty array`);
    }
    for (const k of ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                     "minItems", "maxItems", "minProperties", "maxProperties"]) {
      if (k in schema && typeof schema[k] !== "number") problems.push(`${path}.${k}: must be a number`);
    }
    for (const [lo, hi] of [["minimum", "maximum"], ["minLength", "maxLength"], ["minItems", "maxItems"]]) {
      if (typeof schema[lo] === "number" && typeof schema[hi] === "number" && schema[lo] > schema[hi]) {
        problems.push(`${path}: ${lo} ${schema[lo]} is above ${hi} ${schema[hi]}`);
      }
    }
    if ("pattern" in schema) {
      try { new RegExp(schema.pattern, "u"); } catch (e) { problems.push(`${path}.pattern: ${e.message}`); }
    }
    if ("$ref" in schema) {
      if (typeof schema.$ref !== "string") problems.push(`${path}.$ref: must be a string`);
      else if (schema.$ref.startsWith("#")) {
        let node = root;
        const parts = schema.$ref.slice(1).split("/").filter(Boolean)
          .map((p) => decodeURIComponent(p).replace(/~1/g, "/").replace(/~0/g, "~"));
        for (const p of parts) node = isObj(node) || Array.isArray(node) ? node[p] : undefined;
        if (node === undefined) problems.push(`${path}.$ref: ${schema.$ref} points nowhere`);
      }
    }
    return problems;
  }

  function parseJSONField(text, what) {
    try {
      return { value: JSON.parse(text) };
    } catch (e) {
      return { error: `${what} is not valid JSON: ${e.message}` };
    }
  }

  // ------------------------------------------------------------------ conversation editor
  const messagesEl = $("#messages");
  const messageTemplate = $("#message-template");

  function messageText(m) {
    return m.content;
  }

  function renderMessages(focus) {
    messagesEl.replaceChildren();
    state.messages.forEach((m, i) => {
      const li = messageTemplate.content.firstElementChild.cloneNode(true);
      li.dataset.index = i;
      li.dataset.role = m.role;
      const role = $(".role", li);
      role.value = m.role;
      role.addEventListener("change", () => {
        m.role = role.value;
        renderMessages({ index: i, sel: ".role" });
      });
      const callId = $(".tool-call-id", li);
      callId.hidden = m.role !== "tool";
      callId.value = m.tool_call_id;
      callId.addEventListener("input", () => { m.tool_call_id = callId.value; });
      const content = $(".content", li);
      content.value = messageText(m);
      content.placeholder = { system: "System prompt…", user: "User message…", assistant: "Assistant reply…",
                              tool: "Tool result…" }[m.role];
      content.addEventListener("input", () => { m.content = content.value; autoGrow(content); });
      const attach = $(".attach", li);
      const file = $(".file", li);
      attach.hidden = m.role !== "user";
      attach.addEventListener("click", () => file.click());
      file.addEventListener("change", () => attachFiles(m, i, file.files));
      const up = $(".up", li), down = $(".down", li), del = $(".delete", li);
      up.disabled = i === 0;
      down.disabled = i === state.messages.length - 1;
      up.addEventListener("click", () => moveMessage(i, -1));
      down.addEventListener("click", () => moveMessage(i, +1));
      del.addEventListener("click", () => {
        state.messages.splice(i, 1);
        renderMessages({ index: Math.min(i, state.messages.length - 1), sel: ".content" });
      });
      const images = $(".images", li);
      m.images.forEach((url, j) => {
        const remove = el("button", { type: "button", class: "icon remove-image", text: "×",
                                      title: "Remove image", ariaLabel: `Remove image ${j + 1}` });
        remove.addEventListener("click", () => {
          m.images.splice(j, 1);
          renderMessages({ index: i, sel: ".attach" });
        });
        images.append(el("figure", { class: "thumb" }, el("img", { src: url, alt: `attached image ${j + 1}` }), remove));
      });
      const calls = $(".calls", li);
      for (const c of m.tool_calls || []) calls.append(toolCallCard(c.function.name, c.function.arguments, c.id));
      messagesEl.append(li);
      autoGrow(content);
    });
    if (focus && focus.index >= 0) {
      const li = messagesEl.children[focus.index];
      const target = li && $(focus.sel, li);
      if (target && !target.disabled && !target.hidden) target.focus();
      else if (li) $(".content", li).focus();
    }
  }

  function autoGrow(textarea) {
    textarea.style.height = "auto";
    textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 320)}px`;
  }

  function moveMessage(i, by) {
    const j = i + by;
    if (j < 0 || j >= state.messages.length) return;
    [state.messages[i], state.messages[j]] = [state.messages[j], state.messages[i]];
    renderMessages({ index: j, sel: by < 0 ? ".up" : ".down" });
  }

  function addMessage(role) {
    state.messages.push(newMessage(role));
    renderMessages({ index: state.messages.length - 1, sel: ".content" });
  }

  function attachFiles(m, i, files) {
    const reads = Array.from(files).map((f) => new Promise((resolve) => {
      if (!f.type.startsWith("image/")) {
        setNote(`${f.name} is not an image`);
        return resolve(null);
      }
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => { setNote(`could not read ${f.name}`); resolve(null); };
      reader.readAsDataURL(f);
    }));
    Promise.all(reads).then((urls) => {
      m.images.push(...urls.filter(Boolean));
      renderMessages({ index: i, sel: ".attach" });
    });
  }

  // The wire form of the conversation: empty messages are left out; images become image_url parts.
  function wireMessages() {
    const out = [];
    for (const m of state.messages) {
      const text = m.content;
      if (!text && !m.images.length && !(m.tool_calls && m.tool_calls.length)) continue;
      const msg = { role: m.role };
      if (m.role === "user" && m.images.length) {
        msg.content = [...(text ? [{ type: "text", text }] : []),
                       ...m.images.map((url) => ({ type: "image_url", image_url: { url } }))];
      } else {
        msg.content = text;
      }
      if (m.role === "assistant" && m.tool_calls && m.tool_calls.length) {
        msg.tool_calls = m.tool_calls;
        if (!text) msg.content = null;
      }
      if (m.role === "tool") msg.tool_call_id = m.tool_call_id;
      out.push(msg);
    }
    return out;
  }

  function setNote(text) {
    $("#send-note").textContent = text;
  }

  // ------------------------------------------------------------------ tool call cards
  function toolCallCard(name, args, id) {
    let pretty = args;
    try { pretty = JSON.stringify(JSON.parse(args), null, 2); } catch (_) { /* partial or not JSON */ }
    return el("div", { class: "tool-call" },
      el("div", { class: "tool-call-head" },
        el("span", { class: "tool-call-kind", text: "tool call" }),
        el("code", { class: "tool-call-name", text: name || "…" }),
        el("span", { class: "tool-call-id-label muted", text: id || "" })),
      el("pre", { class: "tool-call-args", text: pretty || "" }));
  }

  // ------------------------------------------------------------------ panes
  const paneTemplate = $("#pane-template");
  const panesEl = $("#panes");

  const EXAMPLE_SCHEMA = {
    type: "object",
    properties: {
      answer: { type: "string", maxLength: 40 },
      confident: { type: "boolean" },
    },
    required: ["answer", "confident"],
    additionalProperties: false,
  };
  const EXAMPLE_TOOLS = [{
    type: "function",
    function: {
      name: "get_weather",
      description: "Current weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
        required: ["city"],
      },
    },
  }];
  const FUNCTION_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

  class Pane {
    constructor(index) {
      this.index = index;
      this.el = paneTemplate.content.firstElementChild.cloneNode(true);
      this.el.dataset.pane = index;
      this.label = "AB"[index];
      $(".pane-label", this.el).textContent = this.label;
      this.model = $(".model", this.el);
      this.textEl = $(".text", this.el);
      this.callsEl = $(".tool-calls", this.el);
      this.errorsEl = $(".errors", this.el);
      this.stateEl = $(".pane-state", this.el);
      this.controller = null;
      this.result = null;
      this.wire();
    }

    wire() {
      const rfType = $(".rf-type", this.el), rfSchema = $(".rf-schema", this.el);
      const syncRf = () => {
        rfSchema.hidden = rfType.value !== "json_schema";
        $(".rf-example", this.el).hidden = rfType.value !== "json_schema";
        $(".rf-badge", this.el).textContent = rfType.value === "text" ? "" : rfType.value;
        this.validate();
      };
      rfType.addEventListener("change", syncRf);
      rfSchema.addEventListener("input", () => this.validate());
      $(".rf-example", this.el).addEventListener("click", () => {
        rfSchema.value = JSON.stringify(EXAMPLE_SCHEMA, null, 2);
        this.validate();
      });
      const tools = $(".tools-json", this.el);
      tools.addEventListener("input", () => this.validate());
      $(".tools-example", this.el).addEventListener("click", () => {
        tools.value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
        this.validate();
      });
      $(".tool-choice", this.el).addEventListener("change", () => this.validate());
      $(".extra-json", this.el).addEventListener("input", () => this.validate());
      $(".append", this.el).addEventListener("click", () => this.appendReply());
      this.el.addEventListener("input", () => { if (codeDialog.open) renderCode(); });
      this.el.addEventListener("change", () => { if (codeDialog.open) renderCode(); });
      syncRf();
    }

    setModels(models, error) {
      const previous = this.model.value;
      this.model.replaceChildren();
      if (!models.length) {
        this.model.append(el("option", { value: "", text: error || "no models" }));
        return;
      }
      for (const m of models) this.model.append(el("option", { value: m, text: m }));
      this.model.value = models.includes(previous) ? previous : models[0];
    }

    param(name) {
      return $(`[data-param="${name}"]`, this.el);
    }

    // The request body this pane would send (without the stream fields), or {errors}.
    build() {
      const errors = [];
      const body = { model: this.model.value || undefined, messages: wireMessages() };
      const num = (name, { integer = false } = {}) => {
        const input = this.param(name);
        const raw = input.value.trim();
        if (raw === "") return;
        const v = Number(raw);
        if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) {
          errors.push(`${name} must be ${integer ? "an integer" : "a number"}`);
          return;
        }
        body[name] = v;
      };
      num("temperature");
      num("top_p");
      num("max_tokens", { integer: true });
      num("seed", { integer: true });
      num("frequency_penalty");
      num("presence_penalty");
      const stops = this.param("stop").value.split("\n").filter((s) => s !== "").map(unescapeField);
      if (stops.length) body.stop = stops.length === 1 ? stops[0] : stops;
      if (this.param("logprobs").checked) {
        body.logprobs = true;
        const top = this.param("top_logprobs").value.trim();
        if (top !== "") body.top_logprobs = Number(top);
      }
      const rf = this.responseFormat();
      if (rf.error) errors.push(rf.error);
      else if (rf.value) body.response_format = rf.value;
      const tools = this.tools();
      if (tools.error) errors.push(tools.error);
      else if (tools.tools) {
        body.tools = tools.tools;
        if (tools.choice !== undefined) body.tool_choice = tools.choice;
      }
      const extra = this.extra();
      if (extra.error) errors.push(extra.error);
      else Object.assign(body, extra.value);
      if (!body.messages.length) errors.push("the conversation is empty: write a message first");
      return errors.length ? { errors } : { body };
    }

    responseFormat() {
      const type = $(".rf-type", this.el).value;
      if (type === "text") return {};
      if (type === "json_object") return { value: { type: "json_object" } };
      const text = $(".rf-schema", this.el).value.trim();
      if (!text) return { error: "response format: write a JSON schema (or pick text)" };
      const parsed = parseJSONField(text, "response format schema");
      if (parsed.error) return parsed;
      // accepted: a bare schema, OpenAI's {name, schema, strict}, or a whole response_format object
      // (OpenAI's {"type": "json_schema", "json_schema": {...}} or TGI's {"type": "json", "value": schema})
      let spec = parsed.value;
      const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
      if (isObj(spec) && spec.type === "json_schema" && isObj(spec.json_schema)) spec = spec.json_schema;
      else if (isObj(spec) && spec.type === "json" && "value" in spec) spec = spec.value;
      const wrapped = isObj(spec) && "schema" in spec && ("name" in spec || "strict" in spec)
                      && !("type" in spec) && !("properties" in spec);
      if (!wrapped) spec = { name: "response", schema: spec, strict: true };
      const problems = checkSchema(spec.schema);
      if (problems.length) return { error: `response format schema: ${problems.slice(0, 3).join("; ")}` };
      return { value: { type: "json_schema", json_schema: spec } };
    }

    tools() {
      const text = $(".tools-json", this.el).value.trim();
      const select = $(".tool-choice", this.el);
      if (!text) {
        this.setToolChoices([]);
        return {};
      }
      const parsed = parseJSONField(text, "tools");
      if (parsed.error) return parsed;
      let list = parsed.value;
      if (!Array.isArray(list)) list = [list];
      const tools = [];
      for (const [i, t] of list.entries()) {
        if (!t || typeof t !== "object") return { error: `tools[${i}] must be an object` };
        const fn = t.function || (t.name ? t : null);
        if (!fn) return { error: `tools[${i}]: expected {"type": "function", "function": {"name": ...}}` };
        if (typeof fn.name !== "string" || !FUNCTION_NAME.test(fn.name)) {
          return { error: `tools[${i}]: the function needs a name of letters, digits, _ . - (at most 64)` };
        }
        if (fn.parameters !== undefined) {
          const problems = checkSchema(fn.parameters);
          if (problems.length) return { error: `tools[${i}] (${fn.name}) parameters: ${problems.slice(0, 3).join("; ")}` };
        }
        const clean = { name: fn.name };
        if (fn.description !== undefined) clean.description = fn.description;
        if (fn.parameters !== undefined) clean.parameters = fn.parameters;
        if (fn.strict !== undefined) clean.strict = fn.strict;
        tools.push({ type: "function", function: clean });
      }
      this.setToolChoices(tools.map((t) => t.function.name));
      const v = select.value;
      let choice;
      if (v === "auto") choice = undefined;           // the default
      else if (v === "none" || v === "required") choice = v;
      else choice = { type: "function", function: { name: v } };
      return { tools, choice };
    }

    setToolChoices(names) {
      const select = $(".tool-choice", this.el);
      const want = ["auto", "none", "required", ...names];
      const have = Array.from(select.options).map((o) => o.value);
      if (want.join("\n") !== have.join("\n")) {
        const previous = select.value;
        select.replaceChildren(...want.map((v) => el("option", {
          value: v, text: names.includes(v) ? `function: ${v}` : v })));
        select.value = want.includes(previous) ? previous : "auto";
      }
      $(".tools-badge", this.el).textContent = names.length ? String(names.length) : "";
    }

    extra() {
      const text = $(".extra-json", this.el).value.trim();
      $(".extra-badge", this.el).textContent = text ? "on" : "";
      if (!text) return { value: {} };
      const parsed = parseJSONField(text, "extra fields");
      if (parsed.error) return parsed;
      if (!parsed.value || typeof parsed.value !== "object" || Array.isArray(parsed.value)) {
        return { error: "extra fields must be a JSON object" };
      }
      return parsed;
    }

    // Inline messages under each box; returns true when the pane's request can be sent.
    validate() {
      const rf = this.responseFormat();
      $(".rf-error", this.el).textContent = rf.error || "";
      $(".rf-schema", this.el).classList.toggle("invalid", !!rf.error);
      const tools = this.tools();
      $(".tools-error", this.el).textContent = tools.error || "";
      $(".tools-json", this.el).classList.toggle("invalid", !!tools.error);
      const extra = this.extra();
      $(".extra-error", this.el).textContent = extra.error || "";
      $(".extra-json", this.el).classList.toggle("invalid", !!extra.error);
      return !rf.error && !tools.error && !extra.error;
    }

    reset() {
      this.textEl.replaceChildren();
      this.callsEl.replaceChildren();
      this.errorsEl.replaceChildren();
      for (const k of ["ttft", "tps", "prompt", "completion", "total", "finish"]) this.stat(k, "–");
      this.el.classList.remove("done", "failed", "stopped");
      $(".append", this.el).disabled = true;
      this.result = null;
    }

    stat(name, value) {
      $(`.s-${name}`, this.el).textContent = value;
    }

    setState(text, cls) {
      this.stateEl.textContent = text;
      this.stateEl.className = `pane-state ${cls || ""}`;
      this.el.dataset.state = cls || "";
    }

    showError(err) {
      const head = [err.status ? `HTTP ${err.status}` : null, err.code].filter(Boolean).join(" · ");
      const box = el("div", { class: "error", role: "alert" });
      if (head) box.append(el("strong", { text: head }));
      box.append(el("p", { class: "error-message", text: err.message }));
      if (err.param) box.append(el("p", { class: "muted", text: `param: ${err.param}` }));
      if (err.code === "image_input_not_supported") {
        box.append(el("p", { class: "hint", text: `${this.model.value || "This model"} is text-only: remove the `
          + "image, or serve a vision-language model (LLaVA, SmolVLM, Qwen2-VL, …)." }));
      }
      if (err.status === 401) {
        box.append(el("p", { class: "hint", text: "Enter the server's API key in the field at the top." }));
        showKeyBox(true);
      }
      this.errorsEl.append(box);
    }

    async run() {
      const built = this.build();
      this.reset();
      if (built.errors) {
        for (const message of built.errors) this.showError({ message, code: "not_sent" });
        this.setState("not sent", "failed");
        return;
      }
      const body = { ...built.body, stream: true, stream_options: { include_usage: true } };
      const controller = new AbortController();
      this.controller = controller;
      const r = {
        t0: performance.now(), tFirst: null, tLast: null, text: "", calls: [], tokens: 0,
        usage: null, finish: null, pendingLogprobs: [], lastSpan: null, logprobs: !!body.logprobs,
      };
      this.result = r;
      this.setState("waiting…", "waiting");
      const ticker = setInterval(() => this.updateStats(), 100);
      try {
        const res = await fetch(`${API}/chat/completions`, {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
          body: JSON.stringify(body),
          signal: controller.signal,
        });
        if (!res.ok) {
          this.showError(await readError(res));
          this.setState("error", "failed");
          return;
        }
        this.setState("streaming…", "streaming");
        await this.readStream(res, r);
        if (r.error) {
          this.setState("error", "failed");
        } else {
          this.setState(r.finish ? "done" : "ended", "done");
        }
      } catch (e) {
        if (controller.signal.aborted) {
          r.finish = r.finish || "stopped";
          this.setState("stopped", "stopped");
        } else {
          this.showError({ message: `network error: ${e.message}` });
          this.setState("error", "failed");
        }
      } finally {
        clearInterval(ticker);
        r.tEnd = performance.now();
        this.controller = null;
        this.updateStats(true);
        $(".append", this.el).disabled = !(r.text || r.calls.length);
        this.el.classList.add(r.error ? "failed" : "done");
      }
    }

    async readStream(res, r) {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split(/\r?\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === "") {                          // end of one SSE event
            if (data.length) {
              const payload = data.join("\n");
              data = [];
              if (payload === "[DONE]") return;
              this.onEvent(JSON.parse(payload), r);
            }
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          }                                            // comments and other fields: ignored
        }
      }
    }

    onEvent(chunk, r) {
      const now = performance.now();
      if (chunk.error) {
        r.error = chunk.error;
        this.showError({ message: chunk.error.message || "generation failed", code: chunk.error.code,
                         param: chunk.error.param });
        return;
      }
      if (chunk.usage) r.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      const lps = (choice.logprobs && choice.logprobs.content) || [];
      if (lps.length) r.pendingLogprobs.push(...lps);
      if (delta.content) {
        if (r.tFirst === null) r.tFirst = now;
        r.tLast = now;
        r.text += delta.content;
        r.tokens += lps.length || 1;
        if (r.logprobs) {
          const span = el("span", { class: `tok ${probClass(r.pendingLogprobs)}`, text: delta.content });
          span.lp = r.pendingLogprobs;
          r.pendingLogprobs = [];
          r.lastSpan = span;
          this.textEl.append(span);
        } else {
          this.textEl.append(delta.content);
        }
      } else if (lps.length && r.lastSpan) {   // logprobs of held-back text: show them on the last token
        r.lastSpan.lp.push(...r.pendingLogprobs);
        r.pendingLogprobs = [];
      }
      for (const tc of delta.tool_calls || []) {
        if (r.tFirst === null) r.tFirst = now;
        r.tLast = now;
        const i = tc.index ?? r.calls.length;
        const call = r.calls[i] || (r.calls[i] = { id: null, name: "", arguments: "" });
        if (tc.id) call.id = tc.id;
        if (tc.function && tc.function.name) call.name += tc.function.name;
        if (tc.function && tc.function.arguments) call.arguments += tc.function.arguments;
        r.tokens += 1;
        this.renderCalls(r);
      }
      if (choice.finish_reason) r.finish = choice.finish_reason;
      const out = $(".output", this.el);
      out.scrollTop = out.scrollHeight;
    }

    renderCalls(r) {
      this.callsEl.replaceChildren(...r.calls.filter(Boolean).map((c) => toolCallCard(c.name, c.arguments, c.id)));
    }

    updateStats(final = false) {
      const r = this.result;
      if (!r) return;
      const end = r.tEnd ?? performance.now();
      const completion = r.usage ? r.usage.completion_tokens : r.tokens;
      this.stat("ttft", r.tFirst === null ? (final ? "–" : `${fmtMs(end - r.t0)}…`) : fmtMs(r.tFirst - r.t0));
      // decode rate: the tokens after the first, over the time after the first
      const span = ((final ? (r.tLast ?? end) : end) - (r.tFirst ?? end)) / 1000;
      this.stat("tps", completion > 1 && span > 0 ? ((completion - 1) / span).toFixed(1) : "–");
      this.stat("prompt", r.usage ? String(r.usage.prompt_tokens) : "–");
      this.stat("completion", completion || r.usage ? String(completion) : (final ? "0" : "–"));
      this.stat("total", fmtMs(end - r.t0));
      this.stat("finish", r.finish || (final ? "–" : "…"));
    }

    stop() {
      if (this.controller) this.controller.abort();
    }

    appendReply() {
      const r = this.result;
      if (!r) return;
      const m = newMessage("assistant", r.text);
      const calls = r.calls.filter(Boolean);
      if (calls.length) {
        m.tool_calls = calls.map((c) => ({ id: c.id, type: "function",
                                           function: { name: c.name, arguments: c.arguments } }));
      }
      state.messages.push(m, newMessage(calls.length ? "tool" : "user"));
      if (calls.length) state.messages[state.messages.length - 1].tool_call_id = calls[0].id || "";
      renderMessages({ index: state.messages.length - 1, sel: ".content" });
    }
  }

  function probClass(lps) {
    if (!lps.length) return "";
    const p = Math.exp(Math.min(...lps.map((x) => x.logprob)));
    return p >= 0.9 ? "p-high" : p >= 0.5 ? "p-mid" : p >= 0.2 ? "p-low" : "p-vlow";
  }

  // ------------------------------------------------------------------ logprob tooltip
  const tooltip = $("#tooltip");

  function showTooltip(span) {
    tooltip.replaceChildren();
    for (const e of span.lp) {
      const table = el("table");
      table.append(el("caption", { text: `${JSON.stringify(e.token)}  logprob ${e.logprob.toFixed(4)}  `
                                         + `(p ${(100 * Math.exp(e.logprob)).toFixed(1)}%)` }));
      for (const t of e.top_logprobs || []) {
        const row = el("tr", { class: t.token === e.token ? "chosen" : "" },
          el("td", { text: JSON.stringify(t.token) }),
          el("td", { text: t.logprob.toFixed(4) }),
          el("td", { text: `${(100 * Math.exp(t.logprob)).toFixed(1)}%` }));
        table.append(row);
      }
      tooltip.append(table);
    }
    if (!span.lp.length) tooltip.append(el("p", { text: "no logprobs for this text" }));
    tooltip.hidden = false;
    const rect = span.getBoundingClientRect();
    const tip = tooltip.getBoundingClientRect();
    const left = Math.max(4, Math.min(rect.left, window.innerWidth - tip.width - 8));
    const top = rect.bottom + tip.height + 8 < window.innerHeight ? rect.bottom + 4 : rect.top - tip.height - 4;
    tooltip.style.left = `${left}px`;
    tooltip.style.top = `${Math.max(4, top)}px`;
  }

  document.addEventListener("mouseover", (e) => {
    const span = e.target.closest && e.target.closest(".tok");
    if (span && span.lp) showTooltip(span);
    else tooltip.hidden = true;
  });

  // ------------------------------------------------------------------ send / stop
  const sendButton = $("#send"), stopButton = $("#stop");
  let inFlight = 0;

  function activePanes() {
    return state.compare ? state.panes : state.panes.slice(0, 1);
  }

  async function send() {
    if (inFlight) return;
    const panes = activePanes();
    if (!panes.every((p) => p.validate())) {
      setNote("fix the marked fields first");
      return;
    }
    setNote("");
    inFlight = panes.length;
    sendButton.disabled = true;
    stopButton.disabled = false;
    pollHealthSoon();
    await Promise.all(panes.map((p) => p.run().finally(() => { inFlight -= 1; })));
    sendButton.disabled = false;
    stopButton.disabled = true;
    pollHealthSoon();
  }

  function stopAll() {
    for (const p of state.panes) p.stop();
  }

  // ------------------------------------------------------------------ models, key, health
  async function loadModels() {
    try {
      const res = await fetch(`${API}/models`, { headers: authHeaders() });
      if (res.status === 401) {
        state.models = [];
        state.modelsError = state.key ? "wrong API key" : "API key needed";
        showKeyBox(true, state.key ? "this key was refused" : "this server needs an API key");
      } else if (!res.ok) {
        state.models = [];
        state.modelsError = (await readError(res)).message;
      } else {
        const body = await res.json();
        state.models = (body.data || []).map((m) => m.id);
        state.modelsError = null;
        if (state.needsKey) setKeyNote("key accepted", true);
      }
    } catch (e) {
      state.models = [];
      state.modelsError = "server unreachable";
    }
    for (const p of state.panes) p.setModels(state.models, state.modelsError);
  }

  function setKeyNote(text, ok = false) {
    const note = $("#key-note");
    note.textContent = text;
    note.classList.toggle("ok", ok);
  }

  function showKeyBox(needed, note) {
    state.needsKey = state.needsKey || needed;
    $("#key-box").hidden = false;
    if (note) setKeyNote(note);
    if (needed && !state.key) $("#api-key").focus();
  }

  let healthTimer = null;
  async function pollHealth() {
    clearTimeout(healthTimer);
    const box = $("#health");
    try {
      const res = await fetch("/health", { cache: "no-store" });
      const h = await res.json();
      if (h.status === "ok") {
        box.textContent = `${h.model} · running ${h.running} · waiting ${h.waiting}`;
        box.dataset.running = h.running;
        box.className = `health ${h.running ? "busy" : "idle"}`;
      } else {
        box.textContent = "engine unavailable";
        box.className = "health down";
        box.dataset.running = "";
      }
    } catch (_) {
      box.textContent = "server unreachable";
      box.className = "health down";
      box.dataset.running = "";
    }
    const busy = inFlight > 0 || box.dataset.running !== "0";
    healthTimer = setTimeout(pollHealth, document.hidden ? 10000 : busy ? 500 : 3000);
  }

  function pollHealthSoon() {
    clearTimeout(healthTimer);
    healthTimer = setTimeout(pollHealth, 50);
  }

  // ------------------------------------------------------------------ code view
  const codeDialog = $("#code-dialog");
  let codeLang = "python-openai";
  const OPENAI_PARAMS = new Set(["frequency_penalty", "logit_bias", "logprobs", "max_tokens", "max_completion_tokens",
    "n", "parallel_tool_calls", "presence_penalty", "response_format", "seed", "stop", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user"]);
  const HF_PARAMS = new Set(["frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "response_format", "seed", "stop", "temperature", "tool_choice", "tool_prompt", "tools", "top_logprobs",
    "top_p"]);

  // A Python literal for a JSON value, inline when it fits on the line.
  function py(v, indent = 0) {
    const inline = pyInline(v);
    if (inline.length + indent * 4 <= 96 || v === null || typeof v !== "object") return inline;
    const pad = "    ".repeat(indent + 1), end = "    ".repeat(indent);
    if (Array.isArray(v)) return `[\n${v.map((x) => pad + py(x, indent + 1)).join(",\n")},\n${end}]`;
    const items = Object.entries(v).map(([k, x]) => `${pad}${JSON.stringify(k)}: ${py(x, indent + 1)}`);
    return `{\n${items.join(",\n")},\n${end}}`;
  }

  function pyInline(v) {
    if (v === null || v === undefined) return "None";
    if (v === true) return "True";
    if (v === false) return "False";
    if (typeof v === "number") return Number.isFinite(v) ? String(v) : "None";
    if (typeof v === "string") return JSON.stringify(v);
    if (Array.isArray(v)) return `[${v.map(pyInline).join(", ")}]`;
    return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyInline(x)}`).join(", ")}}`;
  }

  function pyCall(fn, body, known) {
    const kwargs = [], extra = {};
    for (const [k, v] of Object.entries(body)) {
      if (v === undefined) continue;
      if (k === "model" || k === "messages" || known.has(k)) kwargs.push(`    ${k}=${py(v, 1)},`);
      else extra[k] = v;
    }
    if (Object.keys(extra).length) kwargs.push(`    extra_body=${py(extra, 1)},`);
    return `${fn}(\n${kwargs.join("\n")}\n)`;
  }

  function codeFor(lang, body) {
    const base = `${location.origin}${API}`;
    const keyed = !!state.key;
    const hasTools = !!body.tools;
    const pyPrint = ["message = completion.choices[0].message", "print(message.content)"];
    if (hasTools) {
      pyPrint.push("for call in message.tool_calls or []:", "    print(call.function.name, call.function.arguments)");
    }
    const js = JSON.stringify(body, null, 2);
    const jsPrint = hasTools
      ? "console.log(completion.choices[0].message.content ?? \"\");\nconsole.log(completion.choices[0].message.tool_calls ?? []);"
      : "console.log(completion.choices[0].message.content);";
    switch (lang) {
      case "python-openai":
        return [
          ...(keyed ? ["import os", ""] : []),
          "from openai import OpenAI",
          "",
          `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=${keyed ? 'os.environ["CHATSERVE_API_KEY"]' : '"unused"'})`,
          "",
          `completion = ${pyCall("client.chat.completions.create", body, OPENAI_PARAMS)}`,
          ...pyPrint,
        ].join("\n");
      case "python-hf":
        return [
          ...(keyed ? ["import os", ""] : []),
          "from huggingface_hub import InferenceClient",
          "",
          `client = InferenceClient(base_url=${JSON.stringify(base)}, api_key=${keyed ? 'os.environ["CHATSERVE_API_KEY"]' : '"unused"'})`,
          "",
          `completion = ${pyCall("client.chat_completion", body, HF_PARAMS)}`,
          ...pyPrint,
        ].join("\n");
      case "js-openai":
        return [
          'import OpenAI from "openai";',
          "",
          `const client = new OpenAI({ baseURL: ${JSON.stringify(base)}, `
            + `apiKey: ${keyed ? "process.env.CHATSERVE_API_KEY" : '"unused"'} });`,
          "",
          `const completion = await client.chat.completions.create(${js});`,
          jsPrint,
        ].join("\n");
      case "js-hf":
        return [
          'import { InferenceClient } from "@huggingface/inference";',
          "",
          `const client = new InferenceClient(${keyed ? "process.env.CHATSERVE_API_KEY" : "undefined"}, `
            + `{ endpointUrl: ${JSON.stringify(base)} });`,
          "",
          `const completion = await client.chatCompletion(${js});`,
          jsPrint,
        ].join("\n");
      case "curl": {
        const quoted = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
        return [
          `curl ${base}/chat/completions \\`,
          "  -H 'Content-Type: application/json' \\",
          ...(keyed ? ['  -H "Authorization: Bearer $CHATSERVE_API_KEY" \\'] : []),
          `  -d '${quoted}'`,
        ].join("\n");
      }
      default:
        return "";
    }
  }

  function renderCode() {
    const paneIndex = state.compare ? Number($("#code-pane").value) : 0;
    const built = state.panes[paneIndex].build();
    const code = $("#code-text");
    $$(".tabs [role=tab]", codeDialog).forEach((b) => {
      const on = b.dataset.lang === codeLang;
      b.setAttribute("aria-selected", on ? "true" : "false");
      b.tabIndex = on ? 0 : -1;
    });
    code.dataset.codeLang = codeLang;
    if (built.errors) {
      code.textContent = `# fix these first:\n${built.errors.map((e) => `#   ${e}`).join("\n")}`;
      $("#copy-code").disabled = true;
    } else {
      code.textContent = codeFor(codeLang, built.body);
      $("#copy-code").disabled = false;
    }
    $("#code-note").textContent = state.key
      ? "Reads the key from $CHATSERVE_API_KEY; the playground keeps it in this tab only."
      : "Non-streaming; add stream=True (stream: true) to stream tokens.";
    $("#copy-note").textContent = "";
  }

  async function copyCode() {
    const text = $("#code-text").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {                                      // no clipboard API (e.g. plain http on a LAN address)
      const area = el("textarea", { value: text });
      codeDialog.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    $("#copy-note").textContent = "copied";
  }

  // ------------------------------------------------------------------ wiring
  function setCompare(on) {
    state.compare = on;
    $("#compare-toggle").checked = on;
    $("#layout").classList.toggle("compare", on);
    panesEl.classList.toggle("compare", on);
    state.panes[1].el.hidden = !on;
    $("#code-pane-label").hidden = !on;
  }

  function init() {
    for (const i of [0, 1]) {
      const pane = new Pane(i);
      state.panes.push(pane);
      panesEl.append(pane.el);
    }
    // B starts as a second parameter set for the same conversation: sampled with a fixed seed
    state.panes[0].param("temperature").value = "0.7";
    state.panes[1].param("temperature").value = "1";
    state.panes[1].param("seed").value = "42";
    setCompare(false);
    renderMessages();

    $$("[data-add]").forEach((b) => b.addEventListener("click", () => addMessage(b.dataset.add)));
    $("#clear").addEventListener("click", () => {
      state.messages = state.messages.filter((m) => m.role === "system").slice(0, 1);
      state.messages.push(newMessage("user"));
      renderMessages({ index: state.messages.length - 1, sel: ".content" });
    });
    sendButton.addEventListener("click", send);
    stopButton.addEventListener("click", stopAll);
    $("#compare-toggle").addEventListener("change", (e) => setCompare(e.target.checked));

    const keyInput = $("#api-key");
    keyInput.value = state.key;
    if (state.key) $("#key-box").hidden = false;
    keyInput.addEventListener("change", () => {
      state.key = keyInput.value.trim();
      if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
      else sessionStorage.removeItem(KEY_STORAGE);
      setKeyNote("");
      loadModels();
    });

    $("#code-button").addEventListener("click", () => {
      renderCode();
      codeDialog.showModal();
      $(`[data-lang="${codeLang}"]`, codeDialog).focus();
    });
    $("#code-close").addEventListener("click", () => codeDialog.close());
    $("#code-pane").addEventListener("change", renderCode);
    $("#copy-code").addEventListener("click", copyCode);
    const tabs = $$(".tabs [role=tab]", codeDialog);
    tabs.forEach((b, i) => {
      b.addEventListener("click", () => { codeLang = b.dataset.lang; renderCode(); });
      b.addEventListener("keydown", (e) => {
        const by = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
        if (!by) return;
        const next = tabs[(i + by + tabs.length) % tabs.length];
        codeLang = next.dataset.lang;
        renderCode();
        next.focus();
      });
    });

    document.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
        e.preventDefault();
        if (!codeDialog.open) send();
      } else if (e.key === "Escape" && inFlight && !codeDialog.open) {
        e.preventDefault();
        stopAll();
      }
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) pollHealthSoon(); });

    loadModels();
    pollHealth();
    const firstUser = state.messages.findIndex((m) => m.role === "user");
    if (firstUser >= 0) $(".content", messagesEl.children[firstUser]).focus();
    document.body.dataset.ready = "1";
  }

  init();
})();
