"""Reading a pipeline's samples out of its output, whatever the output class calls the field."""

import numpy as np
import pytest
from diffusers.pipelines.kandinsky5.pipeline_output import KandinskyImagePipelineOutput, KandinskyPipelineOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from diffaccel.media import pipeline_samples


def test_samples_are_read_from_images_frames_or_kandinskys_image_field():
    images = np.random.rand(2, 8, 8, 3).astype(np.float32)
    clips = np.random.rand(2, 5, 8, 8, 3).astype(np.float32)
    assert np.array_equal(pipeline_samples(ImagePipelineOutput(images=images), False), images)
    # Kandinsky 5's image pipeline names its field `image`: the CLI, farm and evaluation read it too
    assert np.array_equal(pipeline_samples(KandinskyImagePipelineOutput(image=images), False), images)
    assert np.array_equal(pipeline_samples(KandinskyPipelineOutput(frames=clips), True), clips)
    assert np.array_equal(pipeline_samples(KandinskyPipelineOutput(frames=clips)), clips)
    with pytest.raises(ValueError, match=r"KandinskyPipelineOutput holds none of \['images', 'image'\]"):
        pipeline_samples(KandinskyPipelineOutput(frames=clips), False)
