"""Files on disk for the commands: atomic outputs (`atomic.py`), which outputs crane-hf may create, replace or clean
(`output_safety.py`: marker and manifest, protected folders, locks, leftovers of killed runs, writability), names
and paths of output files built from data (`output_names.py`) and the image files a user named (`image_files.py`).

Decoding an image with the decompression-bomb guard is part of the model folder (`models/crane/image_reading.py`),
because the pipeline, which ships as remote code, reads images through it.
"""
