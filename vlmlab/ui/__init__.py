"""The skins: ``%vlm`` magics, the ``vlmlab`` command line and the ipywidgets dashboard. Each parses
its input, calls one function of ``vlmlab.api`` and displays the result."""
