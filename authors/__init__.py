"""The authors' released code as a study of its own: its ADGM (models.py), built on the paper's
classes without the paper's classes carrying switches for it. docs/authors-code.md is the study."""
