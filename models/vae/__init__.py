"""MusicVAE for Cadenza: a latent space of melodies. Map of the package:

data.py        melodies as sixteenth-note events; POP909 cache and windows; user-file extraction; MIDI writing
model.py       encoder, flat and hierarchical decoders, scheduled sampling, beta-VAE loss with free bits
train.py       `cadenza train vae`: resumable training, best by validation, runs recorded in the weights' JSON
weights.py     shipped weights (safetensors + JSON) loading and atomic saving
attributes.py  melody attributes, statistics, validity; attribute vectors in the latent space
evaluate.py    `cadenza eval vae`: the paper's reconstruction / prior / interpolation measures on POP909
bench.py       `cadenza bench vae`: latency at batch 1 and batched throughput on one core
files.py       `cadenza vae sample|interpolate|vary|reconstruct|attribute` on MIDI files
live.py        small synchronous API for live use (load_vae, encode_steps, decode, vary, morph, ...)
cli.py         argparse registration of the commands above
worker.py      the live `vary` / `morph` model stage built on live.py

Docs: docs/vae.md.
"""
