//! Training: losses over token batches, the Adam optimizer with its resumable state, SVF expert
//! training (stage 2: SFT or REINFORCE + KL, DESIGN.md §3) and pretraining a BitNet model from
//! scratch (how the embedded default model was made).

pub mod checkpointed;
pub mod config;
pub mod expert;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod presets;
pub mod pretrain;

pub use config::{Objective, TrainConfig, DEFAULT_RANK};
pub use expert::{lr_at, train_expert, StepStats, TrainSummary};
pub use plan::{memory_plan, MemoryPlan, TrainBase};
pub use presets::{PretrainOverrides, TrainOverrides};
