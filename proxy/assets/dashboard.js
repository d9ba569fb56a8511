// The fleet dashboard: one EventSource on /api/events; each `snapshot` event redraws the
// page. No polling: the proxy builds one snapshot per tick for every open page.
"use strict";

const $ = (id) => document.getElementById(id);
let sparkline = null;

function fmt(n) {
  return n >= 100 ? Math.round(n).toString() : (Math.round(n * 10) / 10).toString();
}

// Bars scale to the busiest gateway of their pool: the spread is what a reader compares, and
// a capacity far above the load (10,000 sessions of room, 7 in use) would leave every bar an
// invisible sliver. Capacity is shown as a number, and as a mark where it falls on the scale.
function drawGateways(gateways) {
  const root = $("gateways");
  const pools = [...new Set(gateways.map((g) => g.pool))].sort();
  const children = [];
  for (const pool of pools) {
    const members = gateways.filter((g) => g.pool === pool);
    const busiest = Math.max(1, ...members.map((g) => g.sessions));
    const serving = members.filter((g) => g.state === "up").map((g) => g.sessions);
    if (pools.length > 1) {
      const head = document.createElement("div");
      head.className = "pool";
      head.dataset.pool = pool;
      const spread = serving.length ? Math.max(...serving) - Math.min(...serving) : 0;
      const mean = serving.length ? serving.reduce((a, b) => a + b, 0) / serving.length : 0;
      head.textContent = `pool ${pool} · spread ${spread} · mean ${fmt(mean)}`;
      children.push(head);
    }
    for (const g of members) children.push(gatewayRow(g, busiest));
  }
  root.replaceChildren(...children);
}

function gatewayRow(g, busiest) {
  const row = document.createElement("div");
  row.className = "gateway";
  row.dataset.gateway = g.name;
  row.dataset.pool = g.pool;
  row.dataset.state = g.state;
  row.dataset.sessions = g.sessions;
  const used = g.capacity ? g.sessions / g.capacity : 0;
  if (g.state === "down") row.classList.add("down");
  else if (g.state === "draining") row.classList.add("draining");
  if (used >= 0.95) row.classList.add("red");
  else if (used >= 0.8) row.classList.add("amber");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = g.name;
  name.title = `${g.name} (pool ${g.pool}, weight ${g.weight})`;
  const track = document.createElement("div");
  track.className = "track";
  const fill = document.createElement("div");
  fill.className = "fill";
  const width = Math.min(100, (100 * g.sessions) / busiest);
  fill.style.width = `${width}%`;
  row.dataset.width = Math.round(width);
  track.appendChild(fill);
  if (g.capacity && g.capacity <= busiest) {
    const mark = document.createElement("div");
    mark.className = "capacity";
    mark.style.left = `${Math.min(100, (100 * g.capacity) / busiest)}%`;
    mark.title = `capacity ${g.capacity}`;
    track.appendChild(mark);
  }
  const info = document.createElement("div");
  const count = document.createElement("div");
  count.className = "count";
  count.textContent = g.capacity ? `${g.sessions} of ${g.capacity}` : `${g.sessions}`;
  const state = document.createElement("div");
  state.className = "state";
  state.textContent =
    g.state === "down"
      ? `down${g.down_for_s != null ? ` for ${g.down_for_s} s` : ""}`
      : g.state === "draining"
        ? `draining${g.moving ? `, ${g.moving} to move` : ""}`
        : "up";
  info.append(count, state);
  row.append(name, track, info);
  return row;
}

function drawEvents(events) {
  const items = events
    .slice()
    .reverse()
    .map((e) => {
      const li = document.createElement("li");
      li.dataset.kind = e.kind;
      li.dataset.id = e.id;
      if (e.gateway) li.dataset.gateway = e.gateway;
      const t = document.createElement("time");
      t.textContent = new Date(e.at).toLocaleTimeString();
      li.append(t, document.createTextNode(e.text));
      return li;
    });
  if (items.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent =
      "Nothing has happened yet: gateways going up or down, drains, moves, reloads and refusals appear here as they happen.";
    items.push(li);
  }
  $("events").replaceChildren(...items);
}

function drawSparkline(history) {
  const xs = history.map((p) => p[0]);
  const ys = history.map((p) => p[1]);
  const data = [xs, ys];
  if (!sparkline) {
    const width = Math.max(300, $("sparkline").clientWidth);
    sparkline = new uPlot(
      {
        width,
        height: 120,
        legend: { show: false },
        scales: {
          // Always the last 10 minutes, however few samples there are yet.
          x: { time: true, range: (u, min, max) => [max - 600, max] },
          y: { range: (u, min, max) => [0, Math.max(2, max + 1)] },
        },
        axes: [
          {
            values: (u, splits) =>
              splits.map((v) => new Date(v * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })),
          },
          { size: 40 },
        ],
        series: [{}, { label: "spread", stroke: "#1c7ed6", fill: "rgba(28,126,214,0.1)", width: 2 }],
      },
      data,
      $("sparkline"),
    );
  } else {
    sparkline.setData(data);
  }
}

function draw(s) {
  $("sessions").textContent = s.gateways.reduce((n, g) => n + g.sessions, 0);
  $("spread").textContent = s.spread;
  $("mean").textContent = fmt(s.mean);
  $("accepted").textContent = fmt(s.accepted_per_s);
  $("refused").textContent = fmt(s.refused_per_s);
  $("moved").textContent = fmt(s.moved_per_s);
  drawGateways(s.gateways);
  drawEvents(s.events);
  drawSparkline(s.spread_history);
  document.body.dataset.updated = s.at;
}

const feed = new EventSource("/api/events");
feed.addEventListener("snapshot", (m) => {
  $("status").textContent = `live · ${new Date().toLocaleTimeString()}`;
  $("status").classList.remove("lost");
  draw(JSON.parse(m.data));
});
feed.onerror = () => {
  $("status").textContent = "connection lost: retrying";
  $("status").classList.add("lost");
};
