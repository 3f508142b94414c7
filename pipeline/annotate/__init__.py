"""What annotators receive and send back: Label Studio files and CSVs under ``OUT/export/``, verdicts
turned into the label-overrides manifest that the next run applies."""
