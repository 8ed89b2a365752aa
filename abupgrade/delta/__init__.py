"""Delta updates: build a slot from what the machine already holds and fetch only the rest.

`index` is the format (in the signed image), `blocks` the per-slot block hashes cached in
state_dir, `plan` decides where each chunk comes from, `remote` fetches byte ranges, `assemble`
turns a plan into the payload's verified bytes, in order.
"""
