// hpr-serve A/B playground: one prompt, two or three columns streaming at once, each with its own HPR edit.
// Plain ES module, no framework, no build step; it talks only to this server's OpenAI-compatible /v1 API.

const KEY_STORAGE = "hpr-playground-api-key"; // sessionStorage: gone with the tab, never in a URL
const TITLES = ["A", "B", "C"];

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const models = { base: null, adapters: [] };
const columns = [];

// ---- API ----------------------------------------------------------------------------------------------------------

function apiKey() {
  return $("#api-key").value.trim();
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** The server's own words for a failed response: the OpenAI error envelope's message, with status and code. */
async function errorText(response) {
  const body = await response.text();
  try {
    const error = JSON.parse(body).error;
    if (error && error.message) {
      const code = [error.code, error.param].filter(Boolean).join(", ");
      return `${response.status}${code ? ` (${code})` : ""}: ${error.message}`;
    }
  } catch {
    // not JSON: show the text as is
  }
  return `${response.status} ${response.statusText}${body ? `: ${body.slice(0, 300)}` : ""}`;
}

/** Yield the payload of every `data:` line of a server-sent event stream. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setStatus(text, bad = false) {
  const status = $("#server-status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
}

async function loadModels() {
  setStatus("Loading models…");
  let response;
  try {
    response = await fetch("/v1/models", { headers: requestHeaders() });
  } catch (error) {
    setStatus(`Cannot reach the server: ${error.message}`, true);
    return;
  }
  if (!response.ok) {
    const hint = response.status === 401 ? " Enter the server's API key above." : "";
    setStatus(`/v1/models: ${await errorText(response)}${hint}`, true);
    return;
  }
  const cards = (await response.json()).data;
  models.base = cards.find((card) => !card.parent) ?? cards[0];
  models.adapters = cards.filter((card) => card.parent && card.hpr);
  const count = models.adapters.length;
  setStatus(`${models.base.id} · ${count} adapter${count === 1 ? "" : "s"} · context ${models.base.max_model_len}`);
  for (const column of columns) column.setModels();
}

// ---- layer specs: "0-3,7" <-> a set of layer indices -------------------------------------------------------------

function formatLayers(layers) {
  const sorted = [...layers].sort((a, b) => a - b);
  const parts = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(j > i ? `${sorted[i]}-${sorted[j]}` : `${sorted[i]}`);
    i = j + 1;
  }
  return parts.join(",") || "none";
}

/** The layers a spec names, or null when the server would refuse it (it then gets to say why). */
function parseLayers(spec, card) {
  const text = spec.trim().toLowerCase();
  const trained = card.hpr.trained_layers;
  if (text === "" || text === "none") return new Set();
  if (text === "all") return new Set(trained);
  if (text === "selected") return new Set(card.hpr.selected_layers);
  const layers = new Set();
  for (const part of text.split(",")) {
    const match = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(part);
    if (!match) return null;
    const [first, last] = [Number(match[1]), Number(match[2] ?? match[1])];
    for (let layer = first; layer <= last; layer++) {
      if (!trained.includes(layer)) return null;
      layers.add(layer);
    }
  }
  return layers;
}

// ---- reproducing a request --------------------------------------------------------------------------------------

/** A value on one line, as JSON (`{"a": [1, 2]}`) or as a Python literal (True, False, None). */
function literal(value, python = false) {
  if (value === null || value === undefined) return python ? "None" : "null";
  if (typeof value === "boolean") return python ? (value ? "True" : "False") : String(value);
  if (typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map((item) => literal(item, python)).join(", ")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${literal(v, python)}`).join(", ")}}`;
}

/** A list, one item a line (messages). */
function listLiteral(items, python, indent) {
  return `[\n${items.map((item) => `${indent}    ${literal(item, python)},`).join("\n")}\n${indent}]`;
}

function curlCommand(body) {
  const fields = Object.entries(body).map(([k, v]) => `  ${JSON.stringify(k)}: ${literal(v)}`);
  const json = `{\n${fields.join(",\n")}\n}`.replaceAll("'", "'\\''");
  const auth = apiKey() ? `  -H "Authorization: Bearer $HPR_API_KEY" \\\n` : "";
  return `curl -s ${location.origin}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n${auth}  -d '${json}'`;
}

function pythonCall(body) {
  const { model, messages, hpr, ...rest } = body;
  const args = [`model=${literal(model)}`, `messages=${listLiteral(messages, true, "    ")}`];
  for (const [name, value] of Object.entries(rest)) args.push(`${name}=${literal(value, true)}`);
  if (hpr) args.push(`extra_body={"hpr": ${literal(hpr, true)}}`);
  const key = apiKey() ? `os.environ["HPR_API_KEY"]` : `"unused"`;
  const lines = [
    ...(apiKey() ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(`${location.origin}/v1`)}, api_key=${key})`,
    "r = client.chat.completions.create(",
    ...args.map((arg) => `    ${arg},`),
    ")",
    "print(r.choices[0].message.content)",
  ];
  if (hpr) lines.push('print(r.choices[0].model_extra["hpr_stats"])');
  return lines.join("\n");
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // plain http on a non-local host has no clipboard API: fall back to a selection
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

// ---- one column -------------------------------------------------------------------------------------------------

class Column {
  constructor(index) {
    this.index = index;
    this.root = $("#column-template").content.firstElementChild.cloneNode(true);
    this.root.dataset.column = String(index);
    this.root.setAttribute("aria-label", `Column ${TITLES[index]}`);
    $(".column-title", this.root).textContent = TITLES[index];
    $(".output", this.root).setAttribute("aria-label", `Output of column ${TITLES[index]}`);
    this.field = (name) => this.root.querySelector(`[name="${name}"]`);
    this.controller = null;
    this.layers = new Set();

    this.loaded = false;
    this.field("adapter").addEventListener("change", () => this.adapterChanged());
    this.field("layers").addEventListener("input", () => this.layersTyped());
    this.field("alpha").addEventListener("input", () => this.showAlpha());
    this.field("scope").addEventListener("change", () => this.summarize());
    this.field("edit-tokens").addEventListener("input", () => this.summarize());
    for (const button of this.root.querySelectorAll("[data-pick]")) {
      button.addEventListener("click", () => {
        this.field("layers").value = button.dataset.pick;
        this.layersTyped();
      });
    }
    const chart = $(".chart", this.root);
    chart.addEventListener("click", (event) => {
      const bar = event.target.closest(".bar");
      if (bar) this.toggleLayer(Number(bar.dataset.layer));
    });
    chart.addEventListener("keydown", (event) => this.chartKey(event));
    $(".stop", this.root).addEventListener("click", () => this.stop());
    for (const button of this.root.querySelectorAll(".copy")) {
      button.addEventListener("click", () => copyText($(`code.${button.dataset.copy}`, this.root).textContent, button));
    }
    this.setModels();
  }

  get card() {
    return models.adapters.find((card) => card.id === this.field("adapter").value) ?? null;
  }

  /** Fill the adapter list from /v1/models; keep the current choice when it still exists. */
  setModels() {
    const select = this.field("adapter");
    const previous = this.loaded ? select.value : null; // before the first list: apply the column's default
    select.replaceChildren(el("option", "", models.base ? `none: ${models.base.id}` : "none: the base model"));
    select.firstElementChild.value = "";
    for (const card of models.adapters) {
      const option = el("option", "", card.id);
      option.value = card.id;
      select.append(option);
    }
    const ids = models.adapters.map((card) => card.id);
    const fallback = this.index === 0 ? "" : (ids[0] ?? "");
    select.value = previous !== null && ["", ...ids].includes(previous) ? previous : fallback;
    if (select.value !== previous) this.adapterChanged();
    this.loaded = models.base !== null;
  }

  /** A new adapter: its selected layers, default alpha, scope and edited tokens. */
  adapterChanged() {
    const card = this.card;
    for (const selector of [".layers", ".strength"]) $(selector, this.root).hidden = !card;
    $(".base-note", this.root).hidden = Boolean(card);
    if (card) {
      // column C starts as B with the other scope: the two ways to apply one adapter, side by side
      const scope = card.hpr.default_scope ?? "all";
      this.field("alpha").value = String(card.hpr.default_alpha ?? 1);
      this.field("scope").value = this.index === 2 ? (scope === "all" ? "generated" : "all") : scope;
      const tokens = card.hpr.default_edit_tokens ?? "all";
      this.field("edit-tokens").value = tokens === "all" ? "" : String(tokens);
      this.layers = new Set(card.hpr.selected_layers);
      this.field("layers").value = formatLayers(this.layers);
    } else {
      this.layers = new Set();
      this.field("layers").value = "";
    }
    this.field("layers").classList.remove("invalid");
    this.renderChart();
    this.showAlpha();
  }

  renderChart() {
    const chart = $(".chart", this.root);
    chart.replaceChildren();
    const card = this.card;
    chart.hidden = !card;
    $(".legend", this.root).hidden = !card;
    if (!card) return;
    const selected = new Set(card.hpr.selected_layers);
    const trained = card.hpr.trained_layers;
    chart.classList.toggle("dense", trained.length > 16);
    trained.forEach((layer, i) => {
      const accuracy = card.hpr.probe_accuracy[String(layer)];
      const bar = el("button", selected.has(layer) ? "bar selected" : "bar");
      bar.type = "button";
      bar.dataset.layer = String(layer);
      bar.tabIndex = i === 0 ? 0 : -1; // one tab stop; arrow keys move along the bars
      const label = `layer ${layer}, probe accuracy ${accuracy === undefined ? "unknown" : accuracy.toFixed(3)}`;
      bar.title = label + (selected.has(layer) ? ", selected by training" : "");
      bar.setAttribute("aria-label", bar.title);
      const fill = el("span", "fill");
      const height = accuracy === undefined ? 0.05 : Math.min(1, Math.max(0.05, (accuracy - 0.5) / 0.5));
      fill.style.height = `${(height * 100).toFixed(1)}%`;
      bar.append(fill, el("span", "num", String(layer)));
      chart.append(bar);
    });
    this.paintChart();
  }

  paintChart() {
    for (const bar of this.root.querySelectorAll(".chart .bar")) {
      bar.setAttribute("aria-pressed", String(this.layers.has(Number(bar.dataset.layer))));
    }
    this.summarize();
  }

  chartKey(event) {
    const bars = [...this.root.querySelectorAll(".chart .bar")];
    const at = bars.indexOf(document.activeElement);
    const moves = { ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: bars.length - 1 };
    if (at < 0 || !(event.key in moves)) return;
    event.preventDefault();
    const next = bars[Math.max(0, Math.min(bars.length - 1, moves[event.key]))];
    bars.forEach((bar) => (bar.tabIndex = bar === next ? 0 : -1));
    next.focus();
  }

  toggleLayer(layer) {
    if (this.layers.has(layer)) this.layers.delete(layer);
    else this.layers.add(layer);
    this.field("layers").value = formatLayers(this.layers);
    this.field("layers").classList.remove("invalid");
    this.paintChart();
  }

  layersTyped() {
    const card = this.card;
    if (!card) return;
    const layers = parseLayers(this.field("layers").value, card);
    this.field("layers").classList.toggle("invalid", layers === null);
    if (layers !== null) this.layers = layers;
    this.paintChart();
  }

  showAlpha() {
    this.field("alpha-value").textContent = Number(this.field("alpha").value).toFixed(2);
    this.summarize();
  }

  summarize() {
    const card = this.card;
    const text = card
      ? `${card.id} · layers ${this.field("layers").value.trim() || "none"} · α ${Number(this.field("alpha").value).toFixed(2)} · ${this.field("scope").value}${this.editTokens() === "all" ? "" : ` · first ${this.editTokens()} tokens`}`
      : "base model, no edit";
    $(".column-summary", this.root).textContent = text;
  }

  /** The edited-tokens field as the API takes it: a count, or "all" when empty. */
  editTokens() {
    const text = this.field("edit-tokens").value.trim();
    return text === "" ? "all" : Number(text);
  }

  /** The request body (streaming) for these messages. */
  body(messages, sharedSeed) {
    const number = (name, fallback) => {
      const text = this.field(name).value.trim();
      return text === "" ? fallback : Number(text);
    };
    const body = {
      model: models.base ? models.base.id : "",
      messages,
      max_tokens: number("max-tokens", 128),
      temperature: number("temperature", 0.7),
      seed: number("seed", sharedSeed),
    };
    const schema = this.schema();
    if (schema) body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
    const card = this.card;
    if (card) {
      body.hpr = {
        adapter: card.id,
        layers: this.field("layers").value.trim() || "none",
        alpha: Number(this.field("alpha").value),
        scope: this.field("scope").value,
        edit_tokens: this.editTokens(),
        return_stats: true,
      };
    }
    return body;
  }

  /** The JSON schema box as an object; null when empty. Throws a SyntaxError naming the problem when it is not JSON. */
  schema() {
    const text = this.field("json-schema").value.trim();
    if (text === "") return null;
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new SyntaxError(`the JSON schema is not JSON: ${error.message}`);
    }
  }

  reset() {
    const output = $(".output", this.root);
    output.replaceChildren();
    for (const selector of [".error", ".applied", ".json-check", ".stats", ".repro"]) $(selector, this.root).hidden = true;
    $(".ttft", this.root).textContent = "TTFT –";
    $(".tps", this.root).textContent = "– tok/s";
    $(".tokens", this.root).textContent = "";
  }

  showError(text) {
    const error = $(".error", this.root);
    error.textContent = text;
    error.hidden = false;
  }

  /** Send the request and stream it into the column. The fetch starts synchronously, before the first await,
   * so every column's request leaves in the same tick and the server can take them into one batch. */
  async run(messages, sharedSeed) {
    this.stop();
    this.reset();
    let body;
    try {
      body = this.body(messages, sharedSeed);
    } catch (error) {
      this.showError(error.message); // nothing is sent
      this.root.dataset.state = "error";
      return;
    }
    const controller = new AbortController();
    this.controller = controller;
    const output = $(".output", this.root);
    const stopButton = $(".stop", this.root);
    const started = performance.now();
    const request = fetch("/v1/chat/completions", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal: controller.signal,
    });
    stopButton.disabled = false;
    output.classList.add("streaming");
    this.root.dataset.state = "running";
    let first = null;
    let tokens = 0;
    let usage = null;
    let stats = null;
    let applied;
    let finish = null;
    const showRate = () => {
      if (first === null) return;
      const seconds = (performance.now() - first) / 1000;
      if (tokens > 1 && seconds > 0) $(".tps", this.root).textContent = `${((tokens - 1) / seconds).toFixed(1)} tok/s`;
      $(".tokens", this.root).textContent = ` · ${tokens} tokens`;
    };
    let outcome = "done";
    try {
      const response = await request;
      if (!response.ok) {
        this.showError(await errorText(response));
        outcome = "error";
        return;
      }
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          this.showError(`stream error: ${chunk.error.message}`);
          outcome = "error";
          continue;
        }
        if (applied === undefined && "hpr" in chunk) applied = chunk.hpr;
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices ?? []) {
          const text = choice.delta?.content;
          if (text) {
            if (first === null) {
              first = performance.now();
              $(".ttft", this.root).textContent = `TTFT ${Math.round(first - started)} ms`;
            }
            tokens++;
            output.append(text);
          }
          if (choice.hpr_stats) stats = choice.hpr_stats;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        showRate();
      }
      if (usage) tokens = usage.completion_tokens;
      showRate();
    } catch (error) {
      if (this.controller !== controller) return; // a newer run of this column took over: leave its output alone
      if (error.name === "AbortError") {
        output.append(el("span", "note", output.textContent ? " [stopped]" : "[stopped]"));
        outcome = "stopped";
      } else {
        this.showError(`request failed: ${error.message}`);
        outcome = "error";
      }
    } finally {
      if (this.controller === controller) {
        this.controller = null;
        stopButton.disabled = true;
        output.classList.remove("streaming");
        this.root.dataset.state = outcome;
      }
    }
    if (outcome === "done" && this.controller === null) this.showResult(body, applied ?? null, stats, finish);
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  showResult(body, applied, stats, finish) {
    const line = $(".applied", this.root);
    line.textContent = applied
      ? `applied: ${applied.adapter} · layers [${applied.layers.join(", ")}] · α ${applied.alpha} · scope ${applied.scope}${applied.edit_tokens === "all" ? "" : ` · first ${applied.edit_tokens} tokens`}`
      : "applied: none (base model)";
    if (finish) line.textContent += ` · finish ${finish}`;
    line.hidden = false;
    if (body.response_format) this.showJsonCheck();
    if (stats) this.showStats(stats);
    $("code.curl", this.root).textContent = curlCommand(body);
    $("code.python", this.root).textContent = pythonCall(body);
    $(".repro", this.root).hidden = false;
  }

  /** Whether the answer parses as JSON (the schema itself is the server's to enforce). */
  showJsonCheck() {
    const check = $(".json-check", this.root);
    try {
      JSON.parse($(".output", this.root).textContent);
      check.textContent = "✓ the answer parses as JSON";
      check.dataset.parses = "yes";
    } catch (error) {
      check.textContent = `✗ the answer does not parse as JSON: ${error.message}`;
      check.dataset.parses = "no";
    }
    check.hidden = false;
  }

  showStats(stats) {
    const grid = $(".stats-grid", this.root);
    grid.replaceChildren();
    for (const head of ["layer", "share rotated", "", "mean angle", ""]) grid.append(el("span", "head", head));
    const layers = Object.keys(stats).sort((a, b) => Number(a) - Number(b));
    const maxAngle = Math.max(Math.PI / 4, ...layers.map((layer) => stats[layer].mean_angle));
    for (const layer of layers) {
      const s = stats[layer];
      const meter = (cls, fraction, label) => {
        const outer = el("span", `meter ${cls}`);
        const inner = el("span");
        inner.style.width = `${(Math.min(1, fraction) * 100).toFixed(1)}%`;
        outer.append(inner);
        outer.setAttribute("role", "img");
        outer.setAttribute("aria-label", label);
        return outer;
      };
      grid.append(
        el("span", "", `L${layer}`),
        meter("share", s.share_rotated, `layer ${layer}: ${s.rotated} of ${s.tokens} positions rotated`),
        el("span", "num", `${Math.round(s.share_rotated * 100)}%`),
        meter("angle", s.mean_angle / maxAngle, `layer ${layer}: mean angle ${s.mean_angle.toFixed(3)} rad`),
        el("span", "num", `${s.mean_angle.toFixed(2)} rad`),
      );
    }
    $(".stats", this.root).hidden = false;
  }
}

// ---- page ---------------------------------------------------------------------------------------------------------

function setColumnCount(count) {
  while (columns.length > count) columns.pop().root.remove();
  while (columns.length < count) {
    const column = new Column(columns.length);
    columns.push(column);
    $("#columns").append(column.root);
  }
  $("#columns").style.setProperty("--columns", String(count));
}

function send(event) {
  event.preventDefault();
  const user = $("#user").value.trim();
  if (!user) {
    $("#user").focus();
    return;
  }
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: user });
  const seed = Math.floor(Math.random() * 2 ** 31); // one seed for every column without its own: a fair A/B
  for (const column of columns) column.run(messages, seed);
}

function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $("#key-form").addEventListener("submit", (event) => event.preventDefault()); // Enter: `change` applies it
  key.addEventListener("change", () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  $("#prompt-form").addEventListener("submit", send);
  $("#user").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#prompt-form").requestSubmit();
  });
  $("#stop-all").addEventListener("click", () => columns.forEach((column) => column.stop()));
  $("#column-count").addEventListener("change", (event) => setColumnCount(Number(event.target.value)));
  setColumnCount(Number($("#column-count").value));
  loadModels();
}

init();
