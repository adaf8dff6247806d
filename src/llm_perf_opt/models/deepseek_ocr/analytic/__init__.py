"""DeepSeek-OCR's analytic side: its module families (`formulas`), the stage costs of a run
(`costs`), its memory footprint (`footprint`), and `model.DeepSeekOCRAnalytic`, which the
harness reaches through `DeepSeekOCRModelConfig.analytic`."""
