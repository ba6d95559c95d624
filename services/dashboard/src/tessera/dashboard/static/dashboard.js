// Live updates: the dashboard's server pushes the tables the control store changed (server-sent events); a page
// showing one of them fetches its main section again. While the control store is down the page asks every 2 s,
// so the banner goes away by itself. Charts are drawn with the vendored uPlot.
(function () {
  "use strict";
  const page = document.body.dataset.page;
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  let tables = null;
  let timer = null;
  window.tesseraDashboard = { events: 0, refreshes: 0 };

  function drawCharts() {
    for (const el of main.querySelectorAll("script.chart-data")) {
      const spec = JSON.parse(el.textContent);
      const box = document.getElementById(el.dataset.for);
      if (!box || !spec.x.length || typeof uPlot === "undefined") continue;
      const colors = ["#2b7bb9", "#d9534f", "#5cb85c", "#f0ad4e"];
      const series = [{}].concat(spec.series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 2 })));
      const data = [spec.x].concat(spec.series.map((s) => s.y));
      // one point (or all at one time) gets a minute around it, not uPlot's default span of years
      const lo = Math.min(...spec.x), hi = Math.max(...spec.x);
      const pad = hi - lo < 60 ? (60 - (hi - lo)) / 2 : 0;
      const x = { time: true, auto: false, range: [lo - pad, hi + pad] };
      const opts = { title: spec.title, width: Math.min(900, main.clientWidth - 20), height: 220, series: series,
                     scales: { x: x } };
      new uPlot(opts, data, box);
    }
  }

  async function refresh() {
    timer = null;
    try {
      const r = await fetch("/fragment/" + page, { cache: "no-store" });
      if (!r.ok) return;
      // failures the reader opened stay open across the refresh
      const open = Array.from(main.querySelectorAll("details[open][data-task-id]"), (d) => d.dataset.taskId);
      main.innerHTML = await r.text();
      for (const id of open) {
        const d = main.querySelector('details[data-task-id="' + id + '"]');
        if (d) d.open = true;
      }
      window.tesseraDashboard.refreshes += 1;
      drawCharts();
    } catch (e) {
      live.classList.add("off");  // the dashboard itself is unreachable: the event stream reconnects by itself
    }
  }

  function schedule(delay) {
    if (timer === null) timer = setTimeout(refresh, delay);
  }

  fetch("/page-tables").then((r) => r.json()).then((t) => { tables = t[page] || []; }).catch(() => { tables = []; });
  const source = new EventSource("/events");
  source.onopen = () => live.classList.remove("off");
  source.onerror = () => live.classList.add("off");
  source.addEventListener("change", (ev) => {
    window.tesseraDashboard.events += 1;
    const changed = ev.data.split(",");
    if (tables === null || changed.some((t) => tables.includes(t))) schedule(300);
  });
  setInterval(() => { if (document.getElementById("store-down")) schedule(0); }, 2000);
  if (page === "serving") setInterval(() => schedule(0), 5000);  // latencies come from /metrics, not from events
  drawCharts();
})();
