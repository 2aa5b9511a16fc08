//! The paper's evaluation metrics (section 4.1): the accuracy matrix's AA,
//! forgetting, BWT and FWT, and the adapters' geometry: OO, AWOM, GSR,
//! collision rates and nuclear norms. Plain f64 math on the host.

pub mod accuracy;
pub mod collision;
pub mod geometry;
pub mod sparsity;

pub use accuracy::{AccuracyMatrix, AccuracySummary};
pub use collision::{average_collision_rate, collision_rate, CollisionThreshold, SupportMask};
pub use geometry::{
    awom, geometry, orthogonal_overlap, site_geometry, GeometrySummary, LowRankUpdate,
    PairCollision, SiteGeometry, SiteHistory,
};
pub use sparsity::{generalized_sparsity_rate, EntryStats};
