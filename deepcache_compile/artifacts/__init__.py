"""Engine files: `export` writes a compiled pair and its `manifest`; `engine` loads it back; `formats/` holds one
file per format (write + load). Loading imports neither the graph passes nor diffusers.
"""
