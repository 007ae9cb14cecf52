"""LIO glue through rtslib-fb: the one seam between targetmirror and configfs."""
