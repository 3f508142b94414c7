// Heatmap overlays load only when asked for: the page-wide toggle or a click on one picture.
(function () {
  "use strict";
  function show(img, on) {
    if (on && img.dataset.src && !img.getAttribute("src")) { img.src = img.dataset.src; }
    img.classList.toggle("shown", on);
  }
  document.querySelectorAll(".heat-toggle").forEach(function (button) {
    button.addEventListener("click", function () {
      var on = button.getAttribute("aria-pressed") !== "true";
      button.setAttribute("aria-pressed", String(on));
      button.textContent = on ? "hide heatmaps" : "show heatmaps";
      document.querySelectorAll("img.heat[data-src]").forEach(function (img) { show(img, on); });
    });
  });
  document.querySelectorAll(".grid .pic").forEach(function (pic) {
    pic.addEventListener("click", function () {
      var img = pic.querySelector("img.heat");
      if (img) { show(img, !img.classList.contains("shown")); }
    });
  });
})();
