"""Small procedural worlds (captioned image data sets) embedded in the project.

``shapes``           the 32x32 "shapes world": coloured circles, squares and triangles on a
                     plain background, with templated captions and a held-out split.
``tokenizer_files``  writes/loads a tiny CLIP BPE tokenizer whose vocabulary covers the
                     shapes-world caption grammar one word per token.
"""
