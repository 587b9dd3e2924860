from vlm.visual.processor import ImageLoadError, ImageProcessor, ImageProcessorConfig, load_image
