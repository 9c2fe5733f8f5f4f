"""Exporting a filtered generated set as a dataset other tools can read.

One module per format or artefact: ``coco`` (COCO JSON through pycocotools),
``voc`` (palette PNG masks), ``grid`` (a contact sheet for eyeballing quality),
``card`` (the dataset card) and ``dataset`` (the stage that composes them).
"""
