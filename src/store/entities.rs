//! sea-orm entities mirroring the tables the migrations create. Timestamps are unix
//! microseconds (see `migrations/`).

pub mod artifact {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "artifacts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub project_id: String,
        pub scope_kind: String,
        pub scope_id: String,
        pub path: String,
        pub size: i64,
        pub sha256: String,
        pub mode: i32,
        pub created_at: i64,
        pub expires_at: Option<i64>,
        pub keep: bool,
        pub deleted_at: Option<i64>,
        pub end_reason: Option<String>,
        pub upload_id: String,
        /// When the artifact stops costing storage: min(deleted_at, expires_at unless kept).
        pub billing_end: Option<i64>,
        /// Pinned as an artifact of the latest PASSED job of its (ref, name)
        /// (`keep_latest_per_ref`); `billing_end` is NULL while pinned.
        pub kept_latest: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod blob {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "blobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sha256: String,
        pub size: i64,
        pub created_at: i64,
        /// The bytes of a small blob kept in its row; `None`: in the blob store.
        pub content: Option<Vec<u8>>,
        /// The last instant a push referenced the blob or leased it (see `store::sweep`).
        pub last_ref_at: i64,
        /// Incremented each time the content is collected; a push's commit requires the
        /// epoch its lease saw.
        pub epoch: i64,
        /// When the content was deleted by the sweeper; `None` while it is stored.
        pub collected_at: Option<i64>,
        /// Key of the object holding the bytes in the blob store; `None`: the content
        /// address (see `blob::BlobStore`).
        pub location: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod push_idempotency {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "push_idempotency")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope_kind: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub idempotency_key: String,
        pub artifact_id: i64,
        pub deduplicated: bool,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod project {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "projects")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        pub plan_id: String,
        pub retention_job_days: Option<i32>,
        pub retention_workflow_days: Option<i32>,
        pub retention_project_days: Option<i32>,
        pub spend_cap_micros: Option<i64>,
        pub storage_cap_bytes: Option<i64>,
        pub alert_thresholds: String,
        pub keep_latest_per_ref: bool,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod usage_event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub project_id: String,
        pub meter: String,
        pub bytes: i64,
        pub occurred_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod usage_alert {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_alerts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub period: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub meter: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub threshold: i32,
        pub basis: String,
        pub figure: String,
        pub limit_value: String,
        pub crossed_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
