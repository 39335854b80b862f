// One column's edit: the adapter, its layers (a spec field and a bar chart), α, scope and edited tokens, and the
// one-line summary in the column's head. It turns them into the request's `hpr` extension.

import { $, el } from "./dom.js";

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

// ---- the controls ---------------------------------------------------------------------------------------------------

export class EditControls {
  /** The edit fieldset of the column `root` (column `index`: 0 is A); `models` is the page's model list, filled in
   * place when /v1/models answers. */
  constructor(root, index, models) {
    this.root = root;
    this.index = index;
    this.models = models;
    this.field = (name) => this.root.querySelector(`[name="${name}"]`);
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
    this.setModels();
  }

  /** The chosen adapter's model card, or null for the base model. */
  get card() {
    return this.models.adapters.find((card) => card.id === this.field("adapter").value) ?? null;
  }

  /** Fill the adapter list from /v1/models; keep the current choice when it still exists. */
  setModels() {
    const select = this.field("adapter");
    const previous = this.loaded ? select.value : null; // before the first list: apply the column's default
    const base = this.models.base;
    select.replaceChildren(el("option", "", base ? `none: ${base.id}` : "none: the base model"));
    select.firstElementChild.value = "";
    for (const card of this.models.adapters) {
      const option = el("option", "", card.id);
      option.value = card.id;
      select.append(option);
    }
    const ids = this.models.adapters.map((card) => card.id);
    const fallback = this.index === 0 ? "" : (ids[0] ?? "");
    select.value = previous !== null && ["", ...ids].includes(previous) ? previous : fallback;
    if (select.value !== previous) this.adapterChanged();
    this.loaded = base !== null;
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

  /** The request's `hpr` extension (with `return_stats`), or null for the base model. */
  hpr() {
    const card = this.card;
    if (!card) return null;
    return {
      adapter: card.id,
      layers: this.field("layers").value.trim() || "none",
      alpha: Number(this.field("alpha").value),
      scope: this.field("scope").value,
      edit_tokens: this.editTokens(),
      return_stats: true,
    };
  }
}
