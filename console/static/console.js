// keypool console: live refresh, countdowns, copy buttons and delete
// confirmations. Plain JavaScript, no framework, no inline handlers (the
// Content-Security-Policy allows none).
(function () {
  "use strict";

  // Countdowns: <span data-until="RFC 3339"> shows the time left.
  function fmt(ms) {
    if (ms <= 0) return "now";
    var s = Math.round(ms / 1000), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    s = s % 60;
    return (h ? h + "h" : "") + (h || m ? m + "m" : "") + s + "s";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-until]").forEach(function (el) {
      el.textContent = fmt(Date.parse(el.getAttribute("data-until")) - now);
    });
  }

  // Live regions: <div data-refresh="URL" data-interval="ms"> is replaced
  // by the fragment the server renders at URL (escaped HTML), unless the
  // user is typing in it.
  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var every = parseInt(el.getAttribute("data-interval") || "3000", 10);
    function again() { window.setTimeout(go, every); }
    function go() {
      if (document.hidden || el.contains(document.activeElement) && document.activeElement !== document.body) {
        again();
        return;
      }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined) {
            el.innerHTML = html;
            bind(el);
            tick();
          }
        })
        .catch(function () {})
        .then(again);
    }
    again();
  }

  // Forms with data-confirm ask first.
  function bind(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (f) {
      if (f.dataset.bound) return;
      f.dataset.bound = "1";
      f.addEventListener("submit", function (e) {
        if (!window.confirm(f.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
    root.querySelectorAll("button[data-copy]").forEach(function (b) {
      if (b.dataset.bound) return;
      b.dataset.bound = "1";
      b.addEventListener("click", function () {
        var input = document.getElementById(b.getAttribute("data-copy"));
        input.select();
        var done = function () { b.textContent = "Copied"; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(input.value).then(done, function () { document.execCommand("copy"); done(); });
        } else {
          document.execCommand("copy");
          done();
        }
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    bind(document);
    document.querySelectorAll("[data-refresh]").forEach(refresh);
    tick();
    window.setInterval(tick, 1000);
  });
})();
