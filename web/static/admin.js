// Refreshes the numbers of the admin page every few seconds: fetches the same page (with the
// session cookie, as the browser would) and swaps in the elements marked data-live. Forms are
// never touched, and every page works without this file.
(function () {
  "use strict";
  var PERIOD_MS = 5000;

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    document.querySelectorAll("[data-live][id]").forEach(function (old) {
      var updated = fresh.getElementById(old.id);
      if (updated) {
        old.replaceWith(document.importNode(updated, true));
      }
    });
  }

  function refresh() {
    fetch(window.location.pathname, { credentials: "same-origin", cache: "no-store",
                                      redirect: "error" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(swap)
      .catch(function () { /* the numbers stay as they were until the next try */ })
      .then(function () { window.setTimeout(refresh, PERIOD_MS); });
  }

  if (document.querySelector("[data-live][id]")) {
    window.setTimeout(refresh, PERIOD_MS);
  }
}());
