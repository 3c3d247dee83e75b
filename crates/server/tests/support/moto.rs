//! The shared moto server, an EC2 client pointed at it and an image to
//! launch. Only the tests that talk to moto include this (it pulls in the
//! AWS SDK).

/// An EC2 client on moto, and the id of one of moto's images.
pub async fn ec2_with_image() -> (aws_sdk_ec2::Client, String) {
    spot_runners_aws::testing::moto();
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let image = ec2
        .describe_images()
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .min()
        .expect("moto has images");
    (ec2, image)
}
