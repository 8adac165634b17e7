"""Step distillation: few-step students of flow-matching and ε-prediction teachers (latent consistency
distillation, RG-LCD, trajectory distribution matching).

    from diffaccel.distill import LCDConfig, distill, load_student
    distill("reference:image", "students/lcd", LCDConfig(lora_rank=16), max_minutes=60)
    pipe = load_student(diffaccel.pipelines.reference.load("image"), "students/lcd")
    distill("org/my-cogview4", "students/mine", LCDConfig(lora_rank=16), data="my_images/", max_minutes=600)
"""

from .config import LCDConfig, RewardConfig, TDMConfig
from .data import CaptionedClips, CaptionedImages, PromptList
from .consistency import boundary_scalings, consistency_function, euler_step, guided_velocity, pseudo_huber
from .run import distill, load_teacher
from .student import StudentCard, load_student, save_student, set_student_guidance, student_call_defaults, student_of

__all__ = [
    "CaptionedClips", "CaptionedImages", "LCDConfig", "PromptList", "RewardConfig", "StudentCard", "boundary_scalings", "consistency_function", "distill", "euler_step",
    "guided_velocity", "load_student", "load_teacher", "pseudo_huber", "save_student", "set_student_guidance",
    "student_call_defaults",
    "student_of", "TDMConfig",
]
