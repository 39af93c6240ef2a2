"""Logical axis names, the one place they are spelled.

Parameters carry these names through `nn.with_logical_partitioning`; activations are
constrained with them at block boundaries. The config's logical axis rules map each name to
mesh axes (`vitvq/parallel.py`); a name with no rule is replicated.
"""

# Activations.
BATCH = "batch"
LENGTH = "length"  # tokens of a sequence
# Parameters (and the matching activation dimensions).
EMBED = "embed"  # transformer width
MLP = "mlp"  # hidden width of feed-forward layers
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # VIM output classes (codebook entries)
CODEBOOK = "codebook"  # entries of the quantizer's codebook
CODE_DIM = "code_dim"  # low-dimensional lookup space
PATCH = "patch"  # flattened pixels of one patch (patch * patch * channels)
CLASSES = "classes"  # class embeddings
CONV_IN = "conv_in"  # convolution input channels (discriminator, small)
CONV_OUT = "conv_out"  # convolution output channels
NONE = None  # never sharded (kernel spatial dims, small vectors)
