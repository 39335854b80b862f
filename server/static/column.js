// One column: its edit and sampling, the streamed request, Stop, and what a finished run shows.

import { errorText, postChatStream, sseData } from "./api.js";
import { $, el } from "./dom.js";
import { EditControls } from "./edit.js";
import { copyText, curlCommand, pythonCall } from "./repro.js";
import { showStats } from "./stats.js";
import { responseFormat, showJsonCheck } from "./structured.js";

const TITLES = ["A", "B", "C"];

export class Column {
  /** Column `index` (0 is A) from the page's template; `models` is the page's model list, filled in place. */
  constructor(index, models) {
    this.index = index;
    this.models = models;
    this.root = $("#column-template").content.firstElementChild.cloneNode(true);
    this.root.dataset.column = String(index);
    this.root.setAttribute("aria-label", `Column ${TITLES[index]}`);
    $(".column-title", this.root).textContent = TITLES[index];
    $(".output", this.root).setAttribute("aria-label", `Output of column ${TITLES[index]}`);
    this.field = (name) => this.root.querySelector(`[name="${name}"]`);
    this.controller = null;

    $(".stop", this.root).addEventListener("click", () => this.stop());
    for (const button of this.root.querySelectorAll(".copy")) {
      button.addEventListener("click", () => copyText($(`code.${button.dataset.copy}`, this.root).textContent, button));
    }
    this.edit = new EditControls(this.root, index, models);
  }

  /** The model list changed: refill the adapter choice. */
  setModels() {
    this.edit.setModels();
  }

  /** The request body (streaming) for these messages. */
  body(messages, sharedSeed) {
    const number = (name, fallback) => {
      const text = this.field(name).value.trim();
      return text === "" ? fallback : Number(text);
    };
    const body = {
      model: this.models.base ? this.models.base.id : "",
      messages,
      max_tokens: number("max-tokens", 128),
      temperature: number("temperature", 0.7),
      seed: number("seed", sharedSeed),
    };
    const format = responseFormat(this.field("json-schema").value);
    if (format) body.response_format = format;
    const hpr = this.edit.hpr();
    if (hpr) body.hpr = hpr;
    return body;
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
    const request = postChatStream(body, controller.signal);
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
    if (body.response_format) showJsonCheck($(".json-check", this.root), $(".output", this.root).textContent);
    if (stats) showStats($(".stats", this.root), stats);
    $("code.curl", this.root).textContent = curlCommand(body);
    $("code.python", this.root).textContent = pythonCall(body);
    $(".repro", this.root).hidden = false;
  }
}
