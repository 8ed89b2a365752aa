"""Images in OCI registries: `oci://HOST[:PORT]/REPO:TAG` or `...@sha256:DIGEST`.

An image is stored as an OCI artifact whose layers, concatenated in order, are the image tar
byte for byte: small framing blobs (the signed head, member headers, padding, the end marker)
between the payloads' stored bytes, so a payload that did not change is the same blob again.

reference  parse and print references
client     the distribution HTTP API: TLS, plain HTTP where allowed, basic and bearer auth
layout     the split of an image tar into blobs, and the OCI manifest that lists them
push       publish an image, uploading only the blobs the registry lacks
pull       stream an image back (digests checked as bytes pass, broken connections resumed),
           and read a tag's version without downloading payloads
"""

from abupgrade.oci.pull import Tagged, check, check_newer, describe, open_image
from abupgrade.oci.push import PushResult, push
from abupgrade.oci.reference import Reference, parse_reference

__all__ = ["PushResult", "Reference", "Tagged", "check", "check_newer", "describe", "open_image",
           "parse_reference", "push"]
