"""The keys of the batch feature dicts the models take and `input_data.inputs` yields.

  IMAGES        float32 [batch, height, width, depth]
  LABELS        float32 [batch, num_classes], one-hot (two-hot for two targets)
  RECONS_IMAGE  float32 like IMAGES, the image the decoder reconstructs
  RECONS_LABEL  int32 [batch], the class of RECONS_IMAGE
  SPARE_IMAGE, SPARE_LABEL  two targets only (MultiMNIST): the second object and its class

The names are the reference's (its `features` dicts).
"""

IMAGES = "images"
LABELS = "labels"
RECONS_IMAGE = "recons_image"
RECONS_LABEL = "recons_label"
SPARE_IMAGE = "spare_image"
SPARE_LABEL = "spare_label"
