"""Wire types and framing of the APIs we speak. Pure: no I/O."""
