// sparsec report page: sort the layer table, expand candidates, link chart marks to rows,
// and record what was rendered (and any script error) for headless checks.
(function () {
  "use strict";
  var errors = document.getElementById("js-errors");
  window.addEventListener("error", function (event) {
    var line = document.createElement("div");
    line.textContent = String(event.message) + " @" + String(event.lineno);
    errors.appendChild(line);
  });

  var table = document.getElementById("layer-table");
  var tbody = table.tBodies[0];

  function pairs() {
    // Each layer row is followed by its candidates row; they move together.
    var out = [];
    var rows = tbody.querySelectorAll("tr.layer");
    for (var i = 0; i < rows.length; i++) {
      out.push([rows[i], tbody.querySelector('tr.cands[data-layer="' + rows[i].dataset.layer + '"]')]);
    }
    return out;
  }

  function sortBy(col, descending) {
    var header = table.querySelector('th[data-col="' + col + '"]');
    if (!header) { return false; }
    var index = Array.prototype.indexOf.call(header.parentNode.children, header);
    var keyed = pairs().map(function (pair) {
      var raw = pair[0].children[index].dataset.sort;
      var num = raw === "" ? NaN : Number(raw);
      return { pair: pair, raw: raw, num: num };
    });
    var numeric = keyed.every(function (k) { return k.raw === "" || !isNaN(k.num); });
    keyed.sort(function (a, b) {
      if (a.raw === "" && b.raw === "") { return 0; }
      if (a.raw === "") { return 1; }   // unknown values sort last either way
      if (b.raw === "") { return -1; }
      var c = numeric ? a.num - b.num : a.raw.localeCompare(b.raw);
      return descending ? -c : c;
    });
    keyed.forEach(function (k) { tbody.appendChild(k.pair[0]); if (k.pair[1]) { tbody.appendChild(k.pair[1]); } });
    var ths = table.querySelectorAll("th");
    for (var i = 0; i < ths.length; i++) { ths[i].removeAttribute("aria-sort"); }
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
    return true;
  }

  function toggle(row, open) {
    var cands = tbody.querySelector('tr.cands[data-layer="' + row.dataset.layer + '"]');
    var button = row.querySelector("button.toggle");
    if (!cands || !button) { return; }
    var show = open === undefined ? cands.hidden : open;
    cands.hidden = !show;
    button.setAttribute("aria-expanded", show ? "true" : "false");
  }

  table.tHead.addEventListener("click", function (event) {
    var th = event.target.closest("th");
    if (!th) { return; }
    sortBy(th.dataset.col, th.getAttribute("aria-sort") === "ascending");
  });
  table.tHead.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && event.target.dataset.col) { event.target.click(); }
  });
  tbody.addEventListener("click", function (event) {
    if (event.target.closest("button.toggle")) { toggle(event.target.closest("tr.layer")); }
  });

  // Hovering a chart mark highlights its layer's row and marks, and the other way round.
  function highlight(layer, on) {
    var nodes = document.querySelectorAll('[data-layer="' + layer + '"]');
    for (var i = 0; i < nodes.length; i++) { nodes[i].classList.toggle("hl", on); }
  }
  document.addEventListener("mouseover", function (event) {
    var el = event.target.closest && event.target.closest(".mark, tr.layer");
    if (el) { highlight(el.dataset.layer, true); }
  });
  document.addEventListener("mouseout", function (event) {
    var el = event.target.closest && event.target.closest(".mark, tr.layer");
    if (el) { highlight(el.dataset.layer, false); }
  });
  document.addEventListener("click", function (event) {
    var mark = event.target.closest && event.target.closest(".mark");
    if (!mark) { return; }
    var row = tbody.querySelector('tr.layer[data-layer="' + mark.dataset.layer + '"]');
    if (row) { toggle(row, true); row.scrollIntoView({ block: "center" }); }
  });

  // Address options: #sort=<column>:asc|desc&expand=all
  var options = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (part) {
    var kv = part.split("=");
    if (kv[0]) { options[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1] || ""); }
  });
  if (options.sort) {
    var spec = options.sort.split(":");
    if (!sortBy(spec[0], spec[1] === "desc")) {
      var line = document.createElement("div");
      line.textContent = "unknown sort column " + spec[0];
      errors.appendChild(line);
    }
  }
  if (options.expand === "all") {
    var rows = tbody.querySelectorAll("tr.layer");
    for (var j = 0; j < rows.length; j++) { toggle(rows[j], true); }
  }

  var status = document.getElementById("render-status");
  function count(selector) { return String(document.querySelectorAll(selector).length); }
  status.dataset.layerMarks = count("#chart-svg .mark.layer.predicted");
  status.dataset.measuredMarks = count("#chart-svg .mark.layer.measured");
  status.dataset.rejectedMarks = count("#chart-svg .mark.candidate.rejected");
  status.dataset.rows = count("#layer-table tr.layer");
  status.dataset.order = Array.prototype.map.call(tbody.querySelectorAll("tr.layer"),
    function (r) { return r.dataset.layer; }).join(",");
  status.dataset.expanded = count("#layer-table tr.cands:not([hidden])");
  status.textContent = "ready";
})();
