"""How results look: one paper style and export for every figure (`style`): palette, markers and
dashes that survive greyscale, the paper template, PDF/SVG/PNG export and the offline HTML report."""
