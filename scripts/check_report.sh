#!/usr/bin/env bash
# Open a kdprobe study report (or any kdprobe .html page) in headless Chromium and check EACH figure:
#   drawn       plotly drew it (its SVG/WebGL layers exist), or it is a 3-D view that left kdprobe's
#               one-line no-WebGL note instead;
#   data        it holds data: at least one finite number to plot (not empty traces);
#   visible     some of that data lies inside the axes' ranges, the plot area has a size, and the figure
#               sits inside the page (not cut off at the right edge);
# and fail on JavaScript errors and on plotly's "WebGL is not supported" placeholder. A screenshot is saved.
#   usage: scripts/check_report.sh DIR/report.html [screenshot.png | -] [WIDTHxHEIGHT]   (- : no screenshot)
#   NO_WEBGL=1 scripts/check_report.sh ...   checks the page as a browser without WebGL sees it:
#   every 2-D figure must still draw, and 3-D views must leave kdprobe's one-line note instead.
# Exit 0: every figure drawn, with data, visible; 1: otherwise (each failing figure named); 0 with a note
# when Chromium is not installed (it is optional: apt-get install -y chromium).
# How: a copy of the page gets a small script that, once plotly has drawn, measures every figure and
# writes the result into the page; Chromium's --dump-dom returns it (the page itself is not changed).
set -euo pipefail

report=${1:?usage: scripts/check_report.sh DIR/report.html [screenshot.png] [WIDTHxHEIGHT]}
shot=${2:-${report%.html}.png}
size=${3:-1400x2400}
[ -f "$report" ] || { echo "error: $report does not exist; run kdprobe study first" >&2; exit 1; }
py=${PYTHON:-python3}

browser=""
for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
done
if [ -z "$browser" ]; then
    echo "note: Chromium not found, report not checked; install it with: apt-get install -y chromium" >&2
    exit 0
fi

dir=$(cd "$(dirname "$report")" && pwd)
probe="$dir/.kd-check-$$-$(basename "$report")"  # next to the page: its relative links still resolve
profile=$(mktemp -d)
logs=$(mktemp -d)
trap 'rm -rf "$profile" "$logs" "$probe"' EXIT

# the checker: after load (and plotly's drawing), one record per figure, as JSON in <pre id="kd-check">
"$py" - "$report" "$probe" <<'PY'
import sys
page = open(sys.argv[1], encoding="utf-8").read()
checker = r"""<script>
(function () {
  function finite(v) {
    var n = 0;
    if (v === null || v === undefined) return 0;
    if (typeof v === "number") return isFinite(v) ? 1 : 0;
    if (typeof v === "string") return v.length ? 1 : 0;
    if (typeof v.length === "number") { for (var i = 0; i < v.length; i++) n += finite(v[i]); }
    return n;
  }
  function inRange(vals, ax) {  // how many values lie inside the axis's shown range
    if (!ax || !ax.range || !vals) return finite(vals);
    var lo = Math.min(ax.range[0], ax.range[1]), hi = Math.max(ax.range[0], ax.range[1]), n = 0;
    var flat = [].concat.apply([], Array.prototype.slice.call(vals).map(function (v) {
      return (v && typeof v === "object" && typeof v.length === "number") ? Array.prototype.slice.call(v) : [v]; }));
    flat.forEach(function (v) {
      if (v === null || v === undefined) return;
      var l = ax.d2l ? ax.d2l(v) : Number(v);
      if (ax.type === "log") l = Math.log(Number(v)) / Math.LN10;
      if (isFinite(l) && l >= lo - 1e-9 && l <= hi + 1e-9) n++;
    });
    return n;
  }
  function check() {
    var out = [], width = document.documentElement.clientWidth;
    document.querySelectorAll(".plotly-graph-div, .kd-webgl").forEach(function (gd, i) {
      var r = {index: i, id: gd.id || ("figure " + (i + 1))};
      if (gd.querySelector(".kd-no-webgl")) { r.skipped = true; out.push(r); return; }
      var fl = gd._fullLayout, data = gd._fullData || gd.data || [];
      r.drawn = !!(fl && (gd.querySelector(".main-svg") || gd.querySelector("canvas")));
      r.traces = data.length;
      r.data = 0; r.visible = 0;
      data.forEach(function (t) {
        if (t.visible === false) return;
        var pts = finite(t.z !== undefined ? t.z : t.y !== undefined ? t.y : t.x);
        r.data += pts;
        if (!fl || !pts) return;
        if (t.type === "surface" || /^scene/.test(t.scene || "")) { r.visible += pts; return; }
        var xa = fl[(t.xaxis || "x").replace("x", "xaxis")], ya = fl[(t.yaxis || "y").replace("y", "yaxis")];
        if (t.type === "heatmap" || t.type === "contour") {
          r.visible += (t.x === undefined || inRange(t.x, xa)) && (t.y === undefined || inRange(t.y, ya)) ? pts : 0;
        } else {
          var ys = t.y || [], xs = t.x || [], n = 0;
          for (var k = 0; k < ys.length; k++) {
            if (inRange([ys[k]], ya) && (xs.length <= k || inRange([xs[k]], xa))) n++;
          }
          r.visible += n;
        }
      });
      var box = gd.getBoundingClientRect();
      r.width = Math.round(box.width); r.height = Math.round(box.height);
      r.area = fl && fl._size ? Math.round(fl._size.w * fl._size.h) : 0;
      r.inframe = box.width > 0 && box.height > 0 && box.left >= -1 && box.right <= width + 1;
      out.push(r);
    });
    var pre = document.createElement("pre");
    pre.id = "kd-check";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () { setTimeout(check, 2000); });
})();
</script>"""
i = page.rfind("</body>")
page = page[:i] + checker + page[i:] if i >= 0 else page + checker
open(sys.argv[2], "w", encoding="utf-8").write(page)
PY

url="file://$probe"
# offline and quiet: no network, no first-run UI, a throwaway profile; the virtual time budget lets plotly
# finish drawing (ms of page time, not wall time)
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile"
       --virtual-time-budget=${BUDGET_MS:-15000} --window-size="${size/x/,}")
if [ -n "${NO_WEBGL:-}" ]; then flags+=(--disable-webgl --disable-3d-apis); fi

"$browser" "${flags[@]}" --enable-logging=stderr --v=0 --dump-dom "$url" >"$logs/dom.html" 2>"$logs/console.txt" || true
if [ "$shot" != "-" ]; then  # '-': no screenshot
    "$browser" "${flags[@]}" --screenshot="$shot" "file://$dir/$(basename "$report")" >/dev/null 2>&1 || true
fi

echo "report: $report"
[ "$shot" != "-" ] && [ -f "$shot" ] && echo "screenshot: $shot ($(du -k "$shot" | cut -f1) KB)"
status=0
errors=$(grep -E "Uncaught|CONSOLE.*(Error|error)" "$logs/console.txt" || true)
if [ -n "$errors" ]; then
    echo "JavaScript errors:" >&2
    echo "$errors" >&2
    status=1
fi
nogl=$( (grep -o 'class="no-webgl"' "$logs/dom.html" || true) | wc -l)  # plotly's placeholder div
if [ "$nogl" -gt 0 ]; then
    echo "error: $nogl figure(s) show plotly's \"WebGL is not supported\" instead of a plot; 2-D views must not need WebGL" >&2
    status=1
fi
"$py" - "$logs/dom.html" <<'PY' || status=1
import html, json, re, sys
dom = open(sys.argv[1], encoding="utf-8", errors="replace").read()
m = re.search(r'<pre id="kd-check">(.*?)</pre>', dom, re.S)
if not m:
    print("error: the page did not finish loading (no figure check ran); open it in a browser to see why",
          file=sys.stderr)
    sys.exit(1)
figs = json.loads(html.unescape(m.group(1)))
bad, skipped = [], 0
for f in figs:
    name = f"figure {f['index'] + 1} ({f['id']})"
    if f.get("skipped"):
        skipped += 1
        continue
    if not f.get("drawn"):
        bad.append(f"{name}: not drawn")
    elif not f.get("data"):
        bad.append(f"{name}: drawn with no data ({f.get('traces', 0)} traces, no finite value)")
    elif not f.get("visible") or not f.get("area"):
        bad.append(f"{name}: its data lies outside the axes' ranges or the plot area is empty")
    elif not f.get("inframe"):
        bad.append(f"{name}: outside the page frame ({f.get('width')}x{f.get('height')} px, cut off)")
print(f"figures: {len(figs)}, checked: {len(figs) - skipped}, 3-D views left out for lack of WebGL: {skipped}")
for b in bad:
    print(f"error: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
[ $status -eq 0 ] && echo "ok: every figure drawn, with data, visible; no JavaScript errors"
exit $status
