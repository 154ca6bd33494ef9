"""The authors' released code as a study of its own: its ADGM and its ways of averaging q(y|a,x) and
J (models.py), built on the paper's classes without those classes carrying switches for them.
docs/authors-code.md is the study."""
