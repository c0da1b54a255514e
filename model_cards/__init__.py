"""moe-zoo's model-card templates, one per family (see README.md here); shipped inside the package as
``moe_zoo.model_cards`` and rendered by :mod:`moe_zoo.publishing.model_card`."""
