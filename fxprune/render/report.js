
(function () {
  "use strict";
  function value(cell) { var v = cell.getAttribute("data-v"); return v === null ? cell.textContent : v; }
  function sortTable(table, col, descending) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var head = table.tHead.rows[0].cells, numeric = head[col].getAttribute("data-type") === "num";
    rows.sort(function (a, b) {
      var x = value(a.cells[col]), y = value(b.cells[col]);
      var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return descending ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(head, function (th, i) {
      th.setAttribute("aria-sort", i === col ? (descending ? "descending" : "ascending") : "none");
    });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () {
        var state = th.getAttribute("aria-sort"), numeric = th.getAttribute("data-type") === "num";
        sortTable(table, i, state === "none" || state === null ? numeric : state === "ascending");
      });
    });
  });
  var wanted = /^#sort=(-?)([\w-]+)$/.exec(window.location.hash);
  if (wanted) {
    document.querySelectorAll("table.sortable th[data-key='" + wanted[2] + "']").forEach(function (th) {
      sortTable(th.closest("table"), th.cellIndex, wanted[1] === "-");
    });
  }
  document.querySelectorAll("svg.fxprune-groups").forEach(function (svg) {
    function clear() {
      svg.classList.remove("focus");
      svg.querySelectorAll(".box.on").forEach(function (b) { b.classList.remove("on"); });
    }
    svg.addEventListener("mouseover", function (event) {
      clear();
      var box = event.target.closest("[data-group]");
      if (!box) { return; }
      svg.classList.add("focus");
      svg.querySelectorAll("[data-group='" + box.getAttribute("data-group") + "']").forEach(function (b) { b.classList.add("on"); });
    });
    svg.addEventListener("mouseleave", clear);
  });
  document.documentElement.setAttribute("data-ready", "1");
})();
