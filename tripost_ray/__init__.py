"""tripost-ray: TriPosT (Yu et al., NAACL 2024) as a Ray distributed training system."""

__version__ = "0.1.0"
