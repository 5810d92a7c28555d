"""The loss curves of a scripts/gpu_speed.py results file as an SVG (no plotting library: the
bench runs where only the bundle is installed). Each part that logged losses is one line.

    python3 bench/plot_losses.py bench/results/<speed>.json docs/img/<name>.svg"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 720, 360, 56
COLOURS = {"bare": "#666666", "service_bf16": "#1f77b4", "repeat_bf16": "#9467bd", "service_fp8": "#d62728"}


def curves(results: dict) -> dict[str, list[tuple[float, float]]]:
    found = {}
    for name, part in (results.get("parts") or {}).items():
        losses = [(float(step), float(loss)) for step, loss in part.get("losses") or [] if loss is not None]
        if len(losses) > 1:
            found[name] = losses
    return found


def svg(results: dict) -> str:
    lines = curves(results)
    if not lines:
        raise SystemExit("no part of these results logged more than one loss")
    points = [p for line in lines.values() for p in line]
    x_max = max(x for x, _ in points)
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    y_span = (y_max - y_min) or 1.0

    def at(x: float, y: float) -> str:
        px = MARGIN + (WIDTH - 2 * MARGIN) * (x / x_max)
        py = HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * ((y - y_min) / y_span)
        return f"{px:.1f},{py:.1f}"

    s = results.get("settings") or {}
    title = (
        f"loss by step: {s.get('shape')}, seq {s.get('seq_len')}, {s.get('micro_batch')} x {s.get('grad_accum')}, "
        f"{results.get('card')}, {results.get('date')}"
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{MARGIN}" y="24">{title}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 18}" text-anchor="end">step {x_max:.0f}</text>',
        f'<text x="{MARGIN - 6}" y="{HEIGHT - MARGIN}" text-anchor="end">{y_min:.2f}</text>',
        f'<text x="{MARGIN - 6}" y="{MARGIN + 4}" text-anchor="end">{y_max:.2f}</text>',
    ]
    for row, (name, line) in enumerate(lines.items()):
        colour = COLOURS.get(name, "#2ca02c")
        path = " ".join(at(x, y) for x, y in line)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        label_y = MARGIN + 16 * row
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{label_y}" text-anchor="end" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(svg(json.loads(source.read_text())))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
