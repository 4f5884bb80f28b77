"""PyTorch state dicts -> Flax params: ``lxmert`` (LXMERT / X-LXMERT), ``io`` (reading and writing)."""
