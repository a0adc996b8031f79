"""Reading and writing data: studies folders, image sizes and the working grid, LViT datasets, DICOM, the sample data."""
