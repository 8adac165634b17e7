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


def test_one_video_without_a_batch_axis_is_read_as_one_sample():
    """Cosmos 3 Omni's output holds one ``video`` and SANA-WM's ``frames`` one (T, H, W, C) video: both come back as a
    batch of one, so the CLI writes the whole clip and not its first frame."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipelineOutput

    clip = np.random.rand(5, 8, 8, 3).astype(np.float32)
    assert pipeline_samples(Cosmos3OmniPipelineOutput(video=clip, sound=None, action=None), True).shape == (1, 5, 8, 8, 3)
    assert pipeline_samples(KandinskyPipelineOutput(frames=clip), True).shape == (1, 5, 8, 8, 3)
    assert pipeline_samples(ImagePipelineOutput(images=clip), False).shape == (5, 8, 8, 3)  # images stay a batch
