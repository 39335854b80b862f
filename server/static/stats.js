// hpr_stats as a grid: per edited layer, the share of positions rotated and the mean rotation angle, as small bars.

import { $, el } from "./dom.js";

function meter(cls, fraction, label) {
  const outer = el("span", `meter ${cls}`);
  const inner = el("span");
  inner.style.width = `${(Math.min(1, fraction) * 100).toFixed(1)}%`;
  outer.append(inner);
  outer.setAttribute("role", "img");
  outer.setAttribute("aria-label", label);
  return outer;
}

/** Fill the `.stats` section with `stats` ({layer: {tokens, rotated, share_rotated, mean_angle}}) and show it. */
export function showStats(section, stats) {
  const grid = $(".stats-grid", section);
  grid.replaceChildren();
  for (const head of ["layer", "share rotated", "", "mean angle", ""]) grid.append(el("span", "head", head));
  const layers = Object.keys(stats).sort((a, b) => Number(a) - Number(b));
  const maxAngle = Math.max(Math.PI / 4, ...layers.map((layer) => stats[layer].mean_angle));
  for (const layer of layers) {
    const s = stats[layer];
    grid.append(
      el("span", "", `L${layer}`),
      meter("share", s.share_rotated, `layer ${layer}: ${s.rotated} of ${s.tokens} positions rotated`),
      el("span", "num", `${Math.round(s.share_rotated * 100)}%`),
      meter("angle", s.mean_angle / maxAngle, `layer ${layer}: mean angle ${s.mean_angle.toFixed(3)} rad`),
      el("span", "num", `${s.mean_angle.toFixed(2)} rad`),
    );
  }
  section.hidden = false;
}
