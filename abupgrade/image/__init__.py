"""Signed OS images: a strict tar of manifest.json, manifest.sig and the payloads.

keys      Ed25519 key pairs and the keyring of trusted public keys
manifest  what an image holds (parsed strictly) and version comparison
signature manifest.sig: sign, parse, check against a keyring
tar       the small ustar codec images use
compress  payload encoders and bounded decoders
build     make an image
reader    verify an image while streaming its payloads
"""
