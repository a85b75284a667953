"""AnimateDiff clips on the same runtime (``pipeline``) and GIF/MP4 reading and writing (``io``)."""
