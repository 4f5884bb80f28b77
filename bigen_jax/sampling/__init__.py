"""Decoding as compiled loops: ``captions`` (image -> text: greedy, beam, sampling), ``image_tokens`` (text ->
grid of cluster ids: mask-predict and X-LXMERT's orders), ``preview`` (cluster ids -> pixels without a
generator)."""
