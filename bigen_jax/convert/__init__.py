"""PyTorch state dicts -> Flax params: ``lxmert`` (LXMERT / X-LXMERT), ``inception`` (torchvision
InceptionV3), ``io`` (reading and writing)."""
