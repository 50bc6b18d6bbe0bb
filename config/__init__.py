"""How Cadenza is set up: one typed, documented field per knob.

============  ====================================================================================
``settings``  the sections (``[midi]``, ``[engine]``, ``[velocity]``, ``[phrase]``, ``[controls]``,
              ``[audio]``, ``[mqtt]``, ``[data]``), ``load_settings`` (flags > ``CADENZA_``
              environment > TOML file > defaults) and ``to_toml``
``cli``       ``cadenza config show``
============  ====================================================================================
"""
