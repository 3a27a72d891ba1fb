"""Figures and tables of saved patching results (nodes, paths, graph), shared by the Patching page,
`analyses/patching.py` and the HTML report."""
